"""Other tools run side by side with minquant in `minquant bench` (each in its own venv: they pin
versions of transformers that minquant's environment does not use). Not imported by minquant itself."""
