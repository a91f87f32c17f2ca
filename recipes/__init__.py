"""Bundled run recipes (YAML), installed as gpt2cloud.recipe_files."""
