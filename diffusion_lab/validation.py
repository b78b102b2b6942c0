"""Moved (one line, no alias): config checks to config_types, locate to imports, CLI errors to cli."""

raise ImportError(
    "diffusion_lab.validation was split: config_types (check_config, config_errors, ConfigError), imports"
    " (locate), cli (exit_on_user_error, one_line), files (ensure_writable_dir), instantiate (check_model_fits_data)"
)
