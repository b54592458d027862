"""One module per pipeline stage; `stages.cli:main` gathers them into the `pipeline` command."""
