#!/usr/bin/env bash
# Mutation testing of the modules whose bugs the suite must catch (not run by CI: it takes 20-40 minutes).
#
#   tests/mutation.sh [REVISION]      # default: the working tree; e.g. `tests/mutation.sh main~3` for a baseline
#   MUTATION_MODULES="kwserver/server/tls.py" MUTATION_JOBS=2 tests/mutation.sh   # some modules; parallel mutants
#
# mutmut plants one small change (a mutant) at a time in a scratch copy of the code and runs the tests that
# reach the mutated function; a mutant that no test notices "survives". The score per module is printed at
# the end (killed / total) and kept in $MUTATION_DIR/scores.txt; `cd $MUTATION_DIR/repo && mutmut show NAME`
# shows one mutant. pytest runs several times in one process, so its faulthandler plugin is off: disabling it
# at the end of a run would take away the signal handlers wasmtime needs for traps. Only in-process tests kill mutants: servers started by the integration tests import the
# original code, so those tests are left out of the run (and so are the load tests of tests/test_bench.py).
# Accepted survivors, and why: docs/testing.md.
#
# Needs mutmut in the project's virtual environment: .venv/bin/pip install -e '.[mutation]'
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
revision="${1:-}"
work="${MUTATION_DIR:-${TMPDIR:-/tmp}/kwserver-mutation}"
python="$repo/.venv/bin/python"
modules=(kwserver/expressions.py kwserver/admission.py kwserver/evaluation/pool.py kwserver/evaluation/evaluator.py
         kwserver/server/autoscaler.py kwserver/server/tls.py kwserver/runtime/engine.py)
if [ -n "${MUTATION_MODULES:-}" ]; then read -r -a modules <<< "$MUTATION_MODULES"; fi  # e.g. "kwserver/server/tls.py"

"$python" -c "import mutmut" 2>/dev/null || { echo "mutmut is not installed: $repo/.venv/bin/pip install -e '.[mutation]'" >&2; exit 1; }

# A scratch copy of the chosen revision (or of the working tree), with the conformance data beside it, as
# the tests expect it (../shared), both from the copy and from mutmut's `mutants/` directory inside it.
rm -rf "$work"
mkdir -p "$work/repo"
if [ -n "$revision" ]; then
    git -C "$repo" archive "$revision" | tar -x -C "$work/repo"
else
    git -C "$repo" ls-files -co --exclude-standard -z | (cd "$repo" && xargs -0 cp --parents -t "$work/repo" 2>/dev/null || true)
fi
ln -s "$(cd "$repo/.." && pwd)/shared" "$work/shared"
ln -s "$(cd "$repo/.." && pwd)/shared" "$work/repo/shared"

only=$(printf '"%s", ' "${modules[@]}")
cat >> "$work/repo/pyproject.toml" <<EOF

[tool.mutmut]
source_paths = ["kwserver"]
only_mutate = [${only%, }]
pytest_add_cli_args = ["-q", "-p", "no:cacheprovider", "-p", "no:faulthandler", "-m", "not integration", "--ignore=tests/test_bench.py"]
pytest_add_cli_args_test_selection = ["tests"]
also_copy = ["gunicorn.conf.py", "policies", "deploy", "docs", "README.md"]
use_git_change_detection = false
# A mutant that makes a test hang (an endless loop) counts as caught; do not wait 15 times as long for it.
timeout_multiplier = 4.0
# Each mutant is a fresh pytest process that collects the suite first: seconds the estimate does not count.
timeout_constant = 20.0
# Workers are forked from a server that never ran a test: wasmtime's compiler threads do not survive fork, so a
# worker forked after tests compiled modules would hang in its first compile.
process_isolation = "forkserver"
forkserver_warmup = "none"
EOF

cd "$work/repo"
export PATH="$repo/.venv/bin:$PATH"
mutmut run --max-children "${MUTATION_JOBS:-2}" > "$work/run.log" 2>&1 || { tail -30 "$work/run.log"; exit 1; }
mutmut results --all true > "$work/results.txt" 2>&1 || true

# Mutant names are `<dotted module>.x_<function>__mutmut_<n>: <status>`; score each module.
"$python" - "$work/results.txt" "${modules[@]}" > "$work/scores.txt" <<'EOF'
import re
import sys
from collections import Counter

results, modules = sys.argv[1], [m.removesuffix(".py").replace("/", ".") for m in sys.argv[2:]]
killed, total, timeouts, survivors = Counter(), Counter(), Counter(), []
for line in open(results):
    match = re.match(r"\s*(\S+)__mutmut_\d+: (.+)", line)
    if not match:
        continue
    name, status = match.group(1), match.group(2).strip()
    module = next((m for m in sorted(modules, key=len, reverse=True) if name.startswith(m + ".")), None)
    if module is None:
        continue
    total[module] += 1
    if status in ("killed", "timeout", "caught by type check", "segfault"):
        killed[module] += 1
        timeouts[module] += status == "timeout"
    else:
        survivors.append(line.strip())
for module in modules:
    share = f"{100 * killed[module] / total[module]:.0f}%" if total[module] else "-"
    print(f"{module:34} {killed[module]:4} / {total[module]:4}  {share:>4}  ({timeouts[module]} by timeout)")
print(f"{'all':34} {sum(killed.values()):4} / {sum(total.values()):4}")
print("\nsurvivors:")
print("\n".join(survivors))
EOF
cat "$work/scores.txt" | sed '/^survivors:/q'
echo "survivors: $(grep -c __mutmut_ "$work/scores.txt" || true), listed in $work/scores.txt"
