"""Coverage-guided fuzzing of kwserver's parsers with atheris: `python -m fuzz TARGET [libFuzzer flags]`."""
