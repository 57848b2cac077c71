"""jtune's config files: `get_config(arg)` in each; shared pieces in `common`."""
