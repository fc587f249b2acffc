"""Pre-flight checks, resume lookup, the run dir shared by distributed ranks, and the hand-off to
@hydra.main (effrun.main).

Hydra's own flags are parsed with Hydra's own argument parser and forwarded unchanged, so
`--cfg job|hydra|all`, `--info`, `-sc install=bash`, `--config-dir`, `--config-path`,
`--config-name` and `hydra.searchpath=[...]` behave as in any Hydra app; the pre-flight composes
through the same search path.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import List, Optional, Tuple

from omegaconf import OmegaConf

from effrun.config.compose import MODES, Sources, _key_of, check_points, compose_checked, sweep_points, \
    use_sources, validate
from effrun.errors import UserError

INFO_CHOICES = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")


class HydraArgs:
    """Hydra's command line (flags + overrides), parsed by Hydra's own argparse parser."""

    def __init__(self, tokens: List[str]):
        from hydra._internal.utils import get_args_parser

        tokens = list(tokens)
        # `--info` takes an optional value; `--info a=1` would read a=1 as that value: move it last
        for flag in ("--info", "-i"):
            if flag in tokens:
                i = tokens.index(flag)
                nxt = tokens[i + 1] if i + 1 < len(tokens) else None
                if nxt is not None and "=" in nxt:
                    tokens = tokens[:i] + tokens[i + 1:] + [flag]
        parser = get_args_parser()
        parser.prog = "effrun"

        def error(message: str):
            flag = message.split(":", 1)[0].replace("argument ", "").split("/")[0].strip()
            raise UserError(message.split(":", 1)[-1].strip(), key=flag if flag.startswith("-") else "arguments")

        parser.error = error  # type: ignore[method-assign]
        if "--version" in tokens:
            self.version = True
            self.args = parser.parse_args([])
            return
        self.version = False
        self.args = parser.parse_args(tokens)
        a = self.args
        for ov in a.overrides:
            if "=" not in ov and not ov.startswith("~"):
                raise UserError(f"expected key=value, got {ov!r}", key="overrides")
        if a.config_path is not None and not a.config_path.startswith("pkg://"):
            a.config_path = os.path.abspath(a.config_path)  # relative to where effrun runs
        if a.config_dir is not None:
            a.config_dir = os.path.abspath(a.config_dir)
        n = bool(a.cfg) + bool(a.shell_completion) + (a.info is not None)
        if n > 1:
            raise UserError("only one of --cfg, --info and --shell-completion can be given", key="arguments")

    @property
    def overrides(self) -> List[str]:
        return list(self.args.overrides)

    @property
    def info_only(self) -> bool:
        a = self.args
        return self.version or bool(a.cfg or a.info is not None or a.shell_completion or a.help or a.hydra_help)

    @property
    def completion(self) -> bool:
        return not self.version and bool(self.args.shell_completion)

    def flags(self) -> List[str]:
        """Hydra flags to forward (everything but the overrides)."""
        if self.version:
            return ["--version"]
        a, out = self.args, []
        for flag, dest in (("--cfg", "cfg"), ("--package", "package"), ("--config-path", "config_path"),
                           ("--config-name", "config_name"), ("--config-dir", "config_dir"),
                           ("--experimental-rerun", "experimental_rerun")):
            if getattr(a, dest) is not None:
                out += [flag, str(getattr(a, dest))]
        if a.info is not None:
            out += ["--info", a.info]
        for flag, dest in (("--resolve", "resolve"), ("--shell-completion", "shell_completion"),
                           ("--help", "help"), ("--hydra-help", "hydra_help")):
            if getattr(a, dest):
                out.append(flag)
        return out

    def sources(self) -> Sources:
        return Sources(config_path=self.args.config_path, config_name=self.args.config_name,
                       config_dir=self.args.config_dir)


def _use(hargs: HydraArgs, kv: List[str]) -> None:
    """Compose (pre-flight, listings, choices in errors) through the search path this command line
    gives Hydra: --config-path/--config-name/--config-dir and hydra.searchpath=[...]."""
    from effrun.config import paths

    use_sources(hargs.sources())
    extra = [Path(hargs.args.config_dir)] if hargs.args.config_dir else []
    for ov in kv:
        if _key_of(ov) == "hydra.searchpath":
            from hydra.core.override_parser.overrides_parser import OverridesParser

            try:
                value = OverridesParser.create().parse_override(ov).value()
            except Exception as exc:
                raise UserError(str(exc).splitlines()[0], key="hydra.searchpath") from exc
            if not isinstance(value, list):
                raise UserError("must be a list, e.g. hydra.searchpath=[file:///path/to/configs]",
                                key="hydra.searchpath")
            for entry in value:
                d = paths.resolve_search_entry(str(entry))
                if d is not None:
                    extra.append(d)
    primary = paths.resolve_search_entry(hargs.args.config_path) if hargs.args.config_path else None
    paths.set_search(primary, extra)


def _with_mode(mode: Optional[str], kv: List[str]) -> List[str]:
    if mode is None or any(_key_of(o) == "mode" for o in kv):
        return kv
    return [f"mode={mode}", *kv]


def _family_of(group: str, option: str) -> Optional[str]:
    from effrun.listing import _family_of as family_of

    return family_of(group, option) or None


def with_family_data(kv: List[str]) -> List[str]:
    """`model=` of another task family than the default data, and no `data=` (nor a recipe that may
    set it): take that family's default data, so `effrun infer model=efficientvit-m0` just works."""
    if any(_key_of(o) in ("data", "recipe") for o in kv):
        return kv
    model = [o.split("=", 1)[1] for o in kv if _key_of(o) == "model" and not o.startswith("~")]
    if not model or "," in model[-1] or "$" in model[-1]:
        return kv
    from effrun import registry
    from effrun.config.paths import find_config

    fam = _family_of("model", model[-1])
    primary = find_config("", "config")
    default = (OmegaConf.load(primary).get("defaults") if primary else None) or []
    data = next((d["data"] for d in default if isinstance(d, dict) and "data" in d), None)
    spec = registry.families().get(fam) if fam else None
    if spec is None or not spec.default_data or (data and _family_of("data", str(data)) == fam):
        return kv
    return [*kv, f"data={spec.default_data}"]


def validate_command(args: List[str]) -> int:
    mode = args[0] if args and args[0] in MODES else "train"
    hargs = HydraArgs(args[1:] if args and args[0] in MODES else args)
    kv = with_family_data(_with_mode(mode, hargs.overrides))
    _use(hargs, kv)
    cfg = compose_checked(kv)
    validate(cfg, running=False)
    from effrun.config.validate_deep import validate_plugins

    validate_plugins(cfg)
    print(OmegaConf.to_yaml(cfg, resolve=True), end="")
    print("# valid", file=sys.stderr)
    return 0


def preflight(kv: List[str], multirun: bool):
    """Compose and check every point before anything runs or is submitted (one line, exit 2, for
    the first bad point). Returns (points, the composed config of a single run or None)."""
    if multirun:
        points = sweep_points(kv)
        check_points(points)
        return points, None
    from effrun.config.validate_deep import validate_plugins

    cfg = compose_checked(kv)
    validate(cfg)
    validate_plugins(cfg)
    return [kv], cfg


def _resume_dir(kv: List[str]) -> Optional[str]:
    """run.resume=true without hydra.run.dir: continue the newest unfinished run of this config."""
    from effrun.rundir import find_resumable

    cfg = compose_checked(kv, hydra_cfg=True)
    found = find_resumable(cfg)
    return str(found) if found else None


def _quote(path: str) -> str:
    return "'" + path.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _has_run_dir(kv: List[str]) -> bool:
    return any(_key_of(o) == "hydra.run.dir" for o in kv)


def run_dir_for(kv: List[str], cfg) -> Optional[str]:
    """The run dir a single run will use when effrun must fix it before Hydra (resume, or ranks that
    must agree); None to let Hydra resolve hydra.run.dir itself."""
    if _has_run_dir(kv):
        return None
    if cfg.run.resume:  # any YAML-true spelling: the composed (typed) value decides
        return _resume_dir(kv)
    return None


# --- distributed ranks share rank 0's run dir and run id -----------------------------------------
def dist_rank() -> Optional[Tuple[int, int]]:
    """(rank, world size) of this process when a launcher started several (torchrun, accelerate
    launch, Slurm tasks running the CLI); None otherwise."""
    e = os.environ
    try:
        if "RANK" in e and "WORLD_SIZE" in e:
            return int(e["RANK"]), int(e["WORLD_SIZE"])
        if "SLURM_PROCID" in e and "SLURM_NTASKS" in e:
            return int(e["SLURM_PROCID"]), int(e["SLURM_NTASKS"])
    except ValueError:
        return None
    return None


def _rendezvous_store(rank: int, world: int, timeout_s: float):
    """A TCPStore all ranks reach: torchrun's (and accelerate launch's) agent store when there is
    one, else one that rank 0 hosts next to the process group's port (MASTER_PORT + 1)."""
    from datetime import timedelta

    from torch.distributed import TCPStore

    e = os.environ
    t = timedelta(seconds=timeout_s)
    if e.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and "MASTER_ADDR" in e and "MASTER_PORT" in e:
        store = TCPStore(e["MASTER_ADDR"], int(e["MASTER_PORT"]), world, is_master=False, timeout=t)
        return store, f"effrun/{e.get('TORCHELASTIC_RUN_ID', 'run')}", False
    from effrun.launch import slurm_master_addr

    addr = e.get("MASTER_ADDR") or (slurm_master_addr() if "SLURM_PROCID" in e else "127.0.0.1")
    job = e.get("SLURM_JOB_ID")
    port = int(e.get("MASTER_PORT") or (20000 + int(job) % 20000 if job else 29500)) + 1
    if rank != 0:  # poll with a plain socket first: a client TCPStore logs C++ stack traces while it retries
        from effrun.launch import KEY, RENDEZVOUS_ENV, _reachable

        if not _reachable(addr, port, time.monotonic() + timeout_s):
            raise UserError(f"rank {rank} of {world} could not reach rank 0's run-dir store at {addr}:{port} within "
                            f"{timeout_s:g} s (is rank 0 running? timeout: {RENDEZVOUS_ENV})", key=KEY)
    store = TCPStore(addr, port, world, is_master=rank == 0, timeout=t, wait_for_workers=False)
    return store, f"effrun/{job or 'env'}", True


def shared_run_dir(kv: List[str], cfg, timeout_s: Optional[float] = None) -> List[str]:
    """Under torchrun / accelerate launch / Slurm tasks with parallelism=env, every rank runs this
    CLI and would resolve its own `${now:...}` run dir: rank 0 picks the dir (resume lookup or a
    fresh one), writes its run_id there, and the others take both from it. Waits at most the
    rendezvous timeout (EFFRUN_RENDEZVOUS_TIMEOUT_S) for the other ranks: a rank that never
    starts is one line, exit 2, as at the process group's rendezvous."""
    from effrun.launch import KEY, RENDEZVOUS_ENV, timeouts

    p = cfg.parallelism
    r = dist_rank()
    if p.launcher != "env" or p.world_size <= 1 or r is None or r[1] <= 1 or _has_run_dir(kv):
        return kv
    if timeout_s is None:
        timeout_s = timeouts()[0]
    rank, world = r
    try:
        store, prefix, hosted = _rendezvous_store(rank, world, timeout_s)
    except Exception as e:  # DistNetworkError / DistStoreError by torch version
        if isinstance(e, UserError):
            raise
        first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__).strip()[:160]
        raise UserError(f"rank {rank} of {world} could not reach the run-dir store of rank 0 within {timeout_s:g} s "
                        f"({first}; timeout: {RENDEZVOUS_ENV})", key=KEY) from None
    key, acks = f"{prefix}/run_dir", f"{prefix}/run_dir_acks"
    if rank == 0:
        if store.check([key]):  # an elastic restart of the same job: keep its dir
            d = store.get(key).decode()
        else:
            d = run_dir_for(kv, cfg)
            if d is None:
                hcfg = compose_checked(kv, hydra_cfg=True)
                d = str(OmegaConf.select(hcfg, "hydra.run.dir"))
            from effrun.rundir import ensure_run_id

            Path(d).mkdir(parents=True, exist_ok=True)
            ensure_run_id(Path(d), cfg)
            store.set(key, os.path.abspath(d))
            d = os.path.abspath(d)
        if hosted:  # the store goes away with this process's handle: wait until every rank has read
            t0, want = time.time(), [f"{acks}/{q}" for q in range(1, world)]
            while not store.check(want):
                if time.time() - t0 >= timeout_s:
                    missing = [str(q) for q, k in enumerate(want, 1) if not store.check([k])]
                    raise UserError(f"rank(s) {', '.join(missing)} of {world} did not join within {timeout_s:g} s "
                                    "(they take the run dir from rank 0; started ranks must share "
                                    f"MASTER_ADDR/MASTER_PORT; timeout: {RENDEZVOUS_ENV})", key=KEY)
                time.sleep(0.05)
    else:
        try:
            d = store.get(key).decode()
        except Exception:  # DistStoreError / RuntimeError by torch version: rank 0 never published
            raise UserError(f"rank {rank} of {world} got no run dir from rank 0 within {timeout_s:g} s "
                            f"(is rank 0 running? timeout: {RENDEZVOUS_ENV})", key=KEY) from None
        store.set(f"{acks}/{rank}", "1")
    print(f"effrun: rank {rank}/{world}: run dir {d}", file=sys.stderr, flush=True)
    return [*kv, f"hydra.run.dir={_quote(d)}"]


# --- shell completion ------------------------------------------------------------------------------
COMMANDS = ("train", "infer", "plan", "validate", "ls", "report", "fetch")
_OWN_FLAGS = ("-m", "--multirun", "--dry-run", "--debug")


def completion_line() -> None:
    """`-sc query=bash|zsh|fish` (what the installed completion script runs on every TAB): drop
    effrun's own words (the command, -m, --dry-run) from COMP_LINE so that Hydra completes the
    overrides, and offer the commands while the first word is being typed."""
    line = os.environ.get("COMP_LINE")
    if line is None:
        return
    words = line.split(" ")
    prog, rest = words[0], words[1:]
    done, current = rest[:-1], rest[-1] if rest else ""
    if all(w in _OWN_FLAGS or not w for w in done) and "=" not in current:
        print(" ".join(c for c in COMMANDS if c.startswith(current)), end=" ")
    kept = [w for w in done if w not in _OWN_FLAGS and w not in COMMANDS]
    os.environ["COMP_LINE"] = " ".join([prog, *kept, current])


# --- the hand-off to Hydra -------------------------------------------------------------------------
def run_command(mode: Optional[str], tokens: List[str], *, multirun: bool, dry_run: bool,
                debug: bool) -> int:
    hargs = HydraArgs(tokens)
    if multirun and hargs.info_only:
        raise UserError("-m (multirun) does not combine with --cfg, --info or -sc", key="-m")
    kv = hargs.overrides if hargs.completion else with_family_data(_with_mode(mode, hargs.overrides))
    _use(hargs, kv)
    if hargs.completion and any(o.startswith("query=") for o in kv):
        completion_line()
    sweep = None
    if hargs.info_only:
        if dry_run:
            raise UserError("--dry-run lists the jobs of a sweep; it does not combine with --cfg/--info/-sc",
                            key="--dry-run")
        if hargs.args.cfg and not multirun:  # a bad override: one line, like a run
            compose_checked(kv)
    else:
        points, cfg = preflight(kv, multirun)
        if multirun:  # pin the sweep dir, check a Slurm request against the partition
            from effrun import slurm

            kv, sweep = slurm.prepare_sweep(kv, points, dry_run)
            sweep["started"] = time.time()
        if dry_run and sweep is not None:
            slurm.dry_run_listing(sweep)
            return 0
        if dry_run:
            raise UserError("--dry-run needs -m (multirun)", key="--dry-run")
        if not multirun:
            d = run_dir_for(kv, cfg)
            if d:
                kv = [*kv, f"hydra.run.dir={_quote(d)}"]
            kv = shared_run_dir(kv, cfg)
            explicit = [o.split("=", 1)[1] for o in kv if _key_of(o) == "hydra.run.dir"]
            if explicit:  # a dir effrun cannot write, or someone else's files: one line, before any work
                from effrun.rundir import check_run_dir

                check_run_dir(explicit[-1].strip("'\""), key="hydra.run.dir")
    if debug:
        os.environ["HYDRA_FULL_ERROR"] = "1"
    from effrun import main as hydra_entry

    sys.argv = [sys.argv[0] or "effrun", *(["-m"] if multirun else []), *hargs.flags(), *kv]
    query = hargs.completion and any(o.startswith("query=") for o in kv)
    try:
        if query:  # completion candidates without the ConfigStore schemas (technique=paca_schema)
            import contextlib
            import io

            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                hydra_entry.hydra_main()
            print(" ".join(w for w in buf.getvalue().split() if not w.endswith("_schema")))
        else:
            hydra_entry.hydra_main()
    except SystemExit as e:
        if e.code not in (0, None):
            return int(e.code) if isinstance(e.code, int) else 1
    if sweep is not None:
        from effrun import slurm

        not_done = slurm.finish_sweep(sweep)
        if not_done:
            print(f"{len(not_done)} job(s) failed: {', '.join(not_done)}", file=sys.stderr)
            return 1
    return 0

