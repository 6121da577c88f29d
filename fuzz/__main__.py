"""`python -m fuzz TARGET [libFuzzer flags]`: run one target under atheris (coverage-guided).

    python -m fuzz admission_api -max_total_time=600      # ten minutes
    python -m fuzz http_request -runs=100000 corpus/http  # a corpus directory is read and grown

Targets: fuzz/targets.py. A finding stops the run and leaves `crash-<sha1>` in the working directory;
reproduce it with `python -m fuzz TARGET crash-<sha1>`, then make it a regression test. `-runs` and
`-max_total_time` bound a run; the cases run are printed at its end (`Done N runs`).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        from fuzz.targets import TARGETS

        sys.exit(f"usage: python -m fuzz TARGET [libFuzzer flags]; targets: {', '.join(TARGETS)}")
    name, flags = sys.argv[1], sys.argv[2:]
    import importlib

    import atheris

    # Everything the targets reach is imported here, so that atheris instruments it (coverage guidance).
    with atheris.instrument_imports(include=["kwserver", "fuzz"]):
        from fuzz import targets

        for module in targets.MODULES:
            importlib.import_module(module)
    if name not in targets.TARGETS:
        sys.exit(f"unknown target {name!r}; targets: {', '.join(targets.TARGETS)}")
    targets.environment()
    corpus = next((Path(flag) for flag in flags if not flag.startswith("-")), None)
    if corpus is None:
        corpus = Path(tempfile.mkdtemp(prefix=f"kwserver-fuzz-{name}-"))
        flags.append(str(corpus))
    if corpus.is_dir() and not any(corpus.iterdir()):  # a new corpus starts from the seeds
        for index, seed in enumerate(targets.seeds(name)):
            (corpus / f"seed-{index}").write_bytes(seed)
    atheris.Setup([sys.argv[0], *flags], targets.TARGETS[name])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
