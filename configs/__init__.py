"""Run configurations: `get_config(arg)` files for `--config=configs/<name>.py[:arg]`."""
