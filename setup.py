"""Build hook (all metadata lives in pyproject.toml): ship the top-level configs/ and recipes/ inside
the wheel as the package `effrun._configs`, which an installed effrun reads through Hydra's
`pkg://effrun._configs` search path. An editable install (`pip install -e .`) reads them from the
checkout instead, so nothing is copied then. See effrun.config.paths."""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class build_py_with_configs(build_py):  # noqa: N801 (setuptools command naming)
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        dst = Path(self.build_lib) / "effrun" / "_configs"
        if dst.exists():
            shutil.rmtree(dst)
        # configs/recipe is a link to ../recipes: copy what it points to
        shutil.copytree(ROOT / "configs", dst, symlinks=False,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"))
        if not (dst / "recipe").is_dir():
            shutil.copytree(ROOT / "recipes", dst / "recipe")
        (dst / "__init__.py").write_text('"""effrun\'s config tree, copied from configs/ and recipes/ at build time."""\n')


setup(cmdclass={"build_py": build_py_with_configs})
