"""The built-in target profiles (`--profile NAME`): one TOML file each, shipped as package data."""
