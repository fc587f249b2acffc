"""Built-in techniques. Each folder: __init__.py (spec + config, no torch), plugin.py (hooks)."""
