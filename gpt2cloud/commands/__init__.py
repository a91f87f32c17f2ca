"""One module per CLI command: thin wrappers that parse options and print; the work lives elsewhere."""
