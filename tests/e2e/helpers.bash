# Checks in the style of the Kubewarden policies' e2e suites: the exit status of `kwctl run` and `expr`
# matches on what it printed (bats' `run` captures stdout and stderr together in $output).

evaluated() {
    echo "output = ${output}"
    [ "$status" -eq 0 ]
}

accepted() {
    evaluated
    [ "$(expr "$output" : '.*"allowed":true')" -ne 0 ]
}

rejected() {
    evaluated
    [ "$(expr "$output" : '.*"allowed":false')" -ne 0 ]
}

mutated() {
    [ "$(expr "$output" : '.*"patchType":"JSONPatch"')" -ne 0 ]
}

not_mutated() {
    [ "$(expr "$output" : '.*"patchType":"JSONPatch"')" -eq 0 ]
}

# A fixed string (messages hold characters that are special in expr's regular expressions).
says() {
    [[ "$output" == *"$1"* ]]
}

# kwctl could not evaluate the request (invalid settings, unreadable input): non-zero exit status.
refused() {
    echo "output = ${output}"
    [ "$status" -ne 0 ]
}
