"""The host-provided OPA builtins, against the examples of OPA's and Go's documentation.

Expected values are those `opa eval` gives (OPA's builtin reference and its topdown semantics), and
for `sprintf` those of Go's `fmt` package documentation, whose Sprintf OPA calls.
"""

import math

import pytest

from kwserver.runtime import opa_builtins
from kwserver.runtime.opa_builtins import BuiltinError, lookup


def call(name, *args):
    function = lookup(name)
    assert function is not None, f"{name} is not implemented"
    return function(*args)


def test_registry_has_the_reference_set_under_opa_names_plus_its_two_misnamed_keys():
    reference = {
        "trace", "base64url.encode_no_pad", "urlquery.encode", "urlquery.decode", "urlquery.encode_object",
        "urlquery.decode_object", "json.is_valid", "yaml.marshal", "yaml.unmarshal", "yaml.is_valid", "hex.encode",
        "hex.decode", "glob.quote_meta", "json.patch", "regex.split", "regex.template_match", "regex.find_n",
        "semver.is_valid", "semver.compare", "sprintf", "time.now_ns",
    }
    names = set(opa_builtins.implemented_names())
    assert reference <= names
    assert {"time.parse_rfc3339_ns", "time.date", "parse_rfc3339_ns", "date"} <= names
    assert lookup("parse_rfc3339_ns") is lookup("time.parse_rfc3339_ns")
    assert lookup("date") is lookup("time.date")
    assert opa_builtins.missing(["sprintf", "http.send", "date"]) == ["http.send"]


# --- sprintf: Go's fmt documentation examples ----------------------------------------------------------

@pytest.mark.parametrize(("fmt", "args", "expected"), [
    ("%d %x %X %o %b", [42, 42, 42, 42, 42], "42 2a 2A 52 101010"),
    ("%v", [math.pi], "3.141592653589793"),
    ("%.2f", [math.pi], "3.14"),
    ("%6.2f|%-8.3f|%08.3f", [3.14159, 3.14159, -3.14159], "  3.14|3.142   |-003.142"),
    ("%e", [1e6], "1.000000e+06"),
    ("%v", [1e6], "1e+06"),
    ("%v", [123456.0], "123456"),
    ("%g", [1e-7], "1e-07"),
    ("%q", ['"string"'], '"\\"string\\""'),
    ("%x", ["hex this"], "6865782074686973"),
    ("% x", ["hex this"], "68 65 78 20 74 68 69 73"),
    ("%#x", [255], "0xff"),
    ("%5d|%-5d|%05d", [42, 42, -42], "   42|42   |-0042"),
    ("%+d", [5], "+5"),
    ("%[2]d %[1]d", [1, 2], "2 1"),
    ("%c|%U", [65, 0x1F600], "A|U+1F600"),
    ("%.3s|%10.3s|", ["abcdef", "abcdef"], "abc|       abc|"),
    ("100%%", [], "100%"),
    # the "Format errors" section of Go's fmt documentation
    ("%d", ["hi"], "%!d(string=hi)"),
    ("hi", ["guys"], "hi%!(EXTRA string=guys)"),
    ("hi%d", [], "hi%!d(MISSING)"),
    ("%*s", [4.5, "hi"], "%!(BADWIDTH)hi"),
    ("%.*s", [4.5, "hi"], "%!(BADPREC)hi"),
    ("%*[2]d", [7], "%!d(BADINDEX)"),
    ("%.[2]d", [7], "%!d(BADINDEX)"),
    ("%", [], "%!(NOVERB)"),
])
def test_sprintf_follows_go_fmt(fmt, args, expected):
    assert call("sprintf", fmt, args) == expected


def test_sprintf_formats_composite_values_as_rego_text_like_opa():
    # OPA passes numbers and strings to Go as such and every other value as its Rego text.
    assert call("sprintf", "hello %v %v %v", ["world", 42, ["this", "is", "a", "list"]]) == \
        'hello world 42 ["this", "is", "a", "list"]'
    assert call("sprintf", "%v|%s", [{"b": None, "a": True}, False]) == '{"a": true, "b": null}|false'
    assert call("sprintf", "%d", [1.5]) == "%!d(float64=1.5)"
    assert call("sprintf", "image '%v' comes from untrusted registry", ["nginx"]) == \
        "image 'nginx' comes from untrusted registry"
    with pytest.raises(BuiltinError, match="operand 2 must be array"):
        call("sprintf", "%v", "not an array")


# --- strings, regex, glob ---------------------------------------------------------------------------------

def test_regex_split_returns_an_array():
    assert call("regex.split", "[,;]", "a,b;c") == ["a", "b", "c"]
    assert call("regex.split", "a", "banana") == ["b", "n", "n", ""]
    assert call("regex.split", "x*", "abc") == ["a", "b", "c"]  # Go: empty matches split between runes
    assert call("regex.split", ",", "") == [""]


def test_regex_find_n():
    assert call("regex.find_n", "a.", "paranormal", 1) == ["ar"]
    assert call("regex.find_n", "a.", "paranormal", 2) == ["ar", "an"]
    assert call("regex.find_n", "a.", "paranormal", -1) == ["ar", "an", "al"]
    assert call("regex.find_n", "nomatch", "paranormal", -1) == []


def test_regex_template_match_is_anchored_like_opa():
    assert call("regex.template_match", "urn:foo:{.*}", "urn:foo:bar:baz", "{", "}") is True
    assert call("regex.template_match", "urn:foo:<.*>", "urn:foo:bar:baz", "<", ">") is True
    assert call("regex.template_match", "urn:foo:{.*}", "urn:foo:{.*}", "<", ">") is True
    assert call("regex.template_match", "urn:foo:test:section-<[0-9]{2}>:alert-<[0-9]{4}>",
                "urn:foo:test:section-42:alert-1234", "<", ">") is True
    assert call("regex.template_match", "foo:{[0-9]+}", "foo:12:extra", "{", "}") is False
    with pytest.raises(BuiltinError, match="unbalanced braces"):
        call("regex.template_match", "urn:{.*", "urn:x", "{", "}")


def test_regex_replace_expands_go_templates():
    assert call("regex.replace", "-ab-axxb-", "a(x*)b", "T") == "-T-T-"
    assert call("regex.replace", "-ab-axxb-", "a(x*)b", "$1") == "--xx-"
    assert call("regex.replace", "-ab-axxb-", "a(x*)b", "$1W") == "---"  # `$1W` names group "1W"
    assert call("regex.replace", "-ab-axxb-", "a(x*)b", "${1}W") == "-W-xxW-"
    assert call("regex.replace", "-ab-axxb-", "a(?P<x>x*)b", "[$x]") == "-[]-[xx]-"


def test_regex_uses_re2_syntax():
    with pytest.raises(BuiltinError, match="error parsing regexp"):
        call("regex.split", "(?=lookahead)", "x")  # not RE2


def test_glob_quote_meta():
    assert call("glob.quote_meta", "*.github.com") == "\\*.github.com"
    assert call("glob.quote_meta", "api.cdn.github.com") == "api.cdn.github.com"
    assert call("glob.quote_meta", "{foo*}") == "\\{foo\\*\\}"


def test_strings_helpers():
    assert call("strings.any_prefix_match", "foobar", "foo") is True
    assert call("strings.any_prefix_match", ["foobar", "foobaz"], ["bar", "baz"]) is False
    assert call("strings.any_suffix_match", "foobar", ["bar", "baz"]) is True
    assert call("strings.count", "cheese", "e") == 3
    assert call("strings.count", "five", "") == 5
    assert call("strings.reverse", "abc") == "cba"


# --- encodings and serialisation -----------------------------------------------------------------------------

def test_base64url_hex_and_json():
    assert call("base64url.encode_no_pad", "hello?") == "aGVsbG8_"
    assert call("hex.encode", "lorem ipsum") == "6c6f72656d20697073756d"
    assert call("hex.decode", "6c6f72656d20697073756d") == "lorem ipsum"
    with pytest.raises(BuiltinError):
        call("hex.decode", "zz")
    assert call("json.is_valid", "[1,2]") is True
    assert call("json.is_valid", "[1,2") is False
    assert call("json.is_valid", 12) is False


def test_urlquery():
    assert call("urlquery.encode", "español") == "espa%C3%B1ol"
    assert call("urlquery.encode", "a b&c=d/e") == "a+b%26c%3Dd%2Fe"
    assert call("urlquery.decode", "espa%C3%B1ol") == "español"
    assert call("urlquery.decode", "a+b%26c") == "a b&c"
    with pytest.raises(BuiltinError, match="invalid URL escape"):
        call("urlquery.decode", "100%")
    assert call("urlquery.encode_object", {"e": "1", "d": ["1", "2"], "name": "Rafael Fernández"}) == \
        "d=1&d=2&e=1&name=Rafael+Fern%C3%A1ndez"
    assert call("urlquery.decode_object", "a=b&c=d&c=e") == {"a": ["b"], "c": ["d", "e"]}


def test_json_patch():
    assert call("json.patch", {"a": {"foo": 1}}, [{"op": "add", "path": "/a/bar", "value": 2}]) == \
        {"a": {"foo": 1, "bar": 2}}
    assert call("json.patch", {"a": [1]}, [{"op": "replace", "path": "/a/0", "value": 2}]) == {"a": [2]}
    for failing in ([{"op": "test", "path": "/a", "value": 2}], [{"op": "add", "path": "/b/c", "value": 2}]):
        with pytest.raises(BuiltinError):
            call("json.patch", {"a": 1}, failing)


def test_yaml():
    assert call("yaml.unmarshal", "foo: bar\nlist: [1, 2]\nwhen: 2021-01-01\n") == \
        {"foo": "bar", "list": [1, 2], "when": "2021-01-01"}
    assert call("yaml.marshal", {"foo": [1, 2], "bar": "x"}) == "bar: x\nfoo:\n- 1\n- 2\n"
    assert call("yaml.is_valid", "foo: bar") is True
    assert call("yaml.is_valid", "foo: [bar") is False
    with pytest.raises(BuiltinError):
        call("yaml.unmarshal", "foo: [bar")


# --- semver, units, trace, collections -------------------------------------------------------------------------

def test_semver():
    assert call("semver.is_valid", "1.0.0-rc.1+build.5") is True
    assert call("semver.is_valid", "v1.0.0") is False
    assert call("semver.is_valid", 1) is False
    assert call("semver.compare", "1.0.0", "1.0.1") == -1
    assert call("semver.compare", "1.1.0", "1.0.0") == 1
    assert call("semver.compare", "1.0.0+build", "1.0.0") == 0
    assert call("semver.compare", "1.0.0-alpha", "1.0.0") == -1
    with pytest.raises(BuiltinError, match="is not a valid SemVer"):
        call("semver.compare", "1.0", "1.0.0")


def test_units():
    assert call("units.parse_bytes", "1KiB") == 1024
    assert call("units.parse_bytes", "1K") == 1000
    assert call("units.parse_bytes", "10 mb") == 10_000_000
    assert call("units.parse_bytes", "2048") == 2048
    assert call("units.parse", "1m") == 0.001
    assert call("units.parse", "1M") == 1_000_000
    assert call("units.parse", "1Ki") == 1024
    assert call("units.parse", "0.5") == 0.5
    with pytest.raises(BuiltinError):
        call("units.parse_bytes", "10 lightyears")


def test_trace_and_collections():
    assert call("trace", "note") is True
    assert call("object.keys", {"b": 1, "a": 2}) == ["a", "b"]
    assert call("array.reverse", [1, 2, 3]) == [3, 2, 1]


# --- net and crypto ------------------------------------------------------------------------------------------------

def test_net_cidr():
    assert call("net.cidr_is_valid", "192.168.0.0/16") is True
    assert call("net.cidr_is_valid", "192.168.0.1") is False
    assert call("net.cidr_is_valid", "not-a-cidr/8") is False
    assert call("net.cidr_contains", "127.0.0.0/8", "127.0.0.1") is True
    assert call("net.cidr_contains", "127.0.0.0/24", "127.0.0.0/25") is True
    assert call("net.cidr_contains", "127.0.0.0/8", "10.0.0.0/32") is False
    assert call("net.cidr_intersects", "192.168.0.0/16", "192.168.1.0/24") is True
    assert call("net.cidr_expand", "192.168.0.0/30") == ["192.168.0.0", "192.168.0.1", "192.168.0.2", "192.168.0.3"]
    assert call("net.cidr_merge", ["192.0.128.0/24", "192.0.129.0/24"]) == ["192.0.128.0/23"]
    assert call("net.cidr_merge", ["10.0.0.1", "10.0.0.0/32", "2001:db8::/64", "2001:db8:0:1::/64"]) == \
        ["10.0.0.0/31", "2001:db8::/63"]
    assert call("net.cidr_contains_matches", "1.1.1.0/24", "1.1.1.128") == [["1.1.1.0/24", "1.1.1.128"]]
    assert call("net.cidr_contains_matches", ["1.1.1.0/24", "1.1.2.0/24"], "1.1.1.128") == [[0, "1.1.1.128"]]
    assert call("net.cidr_contains_matches", [["1.1.0.0/16", "foo"], "1.1.2.0/24"],
                ["1.1.1.128", ["1.1.254.254", "bar"]]) == [[0, 0], [0, 1]]
    assert call("net.cidr_contains_matches", {"k": "1.1.1.0/24"}, {"x": "1.1.1.1"}) == [["k", "x"]]
    with pytest.raises(BuiltinError):
        call("net.cidr_expand", "10.0.0.0/8")  # refuses to enumerate 16M addresses


def test_crypto_digests_and_hmacs():
    assert call("crypto.md5", "hello") == "5d41402abc4b2a76b9719d911017c592"
    assert call("crypto.sha1", "hello") == "aaf4c61ddcc5e8a2dabede0f3b482cd9aea9434d"
    assert call("crypto.sha256", "hello") == "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    assert call("crypto.hmac.sha256", "hello", "secret") == \
        "88aab3ede8d3adf94d26ab90d3bafd4a2083070c3bcce9c014ee04a443847c0b"
    assert call("crypto.hmac.equal", "abc", "abc") is True
    assert call("crypto.hmac.equal", "abc", "abd") is False


# --- time -------------------------------------------------------------------------------------------------------------

def test_time_parse_rfc3339_and_the_reference_alias():
    assert call("time.parse_rfc3339_ns", "1970-01-01T00:00:00Z") == 0
    assert call("time.parse_rfc3339_ns", "2023-02-28T16:00:00.123456789Z") == 1677600000123456789
    assert call("time.parse_rfc3339_ns", "2023-02-28T17:00:00+01:00") == 1677600000000000000
    assert call("parse_rfc3339_ns", "2023-02-28T17:00:00+01:00") == 1677600000000000000
    for bad in ("2023-02-30T00:00:00Z", "2023-02-28 17:00:00Z", "yesterday"):
        with pytest.raises(BuiltinError):
            call("time.parse_rfc3339_ns", bad)


def test_time_date_clock_weekday_with_zones():
    ns = 1677600000123456789  # 2023-02-28T16:00:00.123456789Z, a Tuesday
    assert call("time.date", ns) == [2023, 2, 28]
    assert call("date", [ns, "Asia/Tokyo"]) == [2023, 3, 1]
    assert call("time.clock", [ns, "America/New_York"]) == [11, 0, 0]
    assert call("time.weekday", ns) == "Tuesday"
    assert call("time.date", -1) == [1969, 12, 31]
    with pytest.raises(BuiltinError, match="unknown time zone"):
        call("time.date", [ns, "Mars/Olympus_Mons"])


def test_time_add_date_normalises_like_go():
    jan31 = call("time.parse_rfc3339_ns", "2023-01-31T10:00:00Z")
    assert call("time.add_date", jan31, 0, 1, 0) == call("time.parse_rfc3339_ns", "2023-03-03T10:00:00Z")
    assert call("time.add_date", jan31, 1, -1, 1) == call("time.parse_rfc3339_ns", "2024-01-01T10:00:00Z")


def test_time_diff():
    a = call("time.parse_rfc3339_ns", "2021-12-31T23:00:00Z")
    b = call("time.parse_rfc3339_ns", "2022-01-01T00:30:00Z")
    assert call("time.diff", a, b) == [0, 0, 0, 1, 30, 0]
    assert call("time.diff", b, a) == [0, 0, 0, 1, 30, 0]
    c = call("time.parse_rfc3339_ns", "2020-02-29T00:00:00Z")
    d = call("time.parse_rfc3339_ns", "2021-03-01T00:00:00Z")
    assert call("time.diff", c, d) == [1, 0, 1, 0, 0, 0]


def test_time_durations_and_layouts():
    assert call("time.parse_duration_ns", "1h30m") == 5_400_000_000_000
    assert call("time.parse_duration_ns", "1.5h") == 5_400_000_000_000
    assert call("time.parse_duration_ns", "-300ms") == -300_000_000
    assert call("time.parse_duration_ns", "2h45m10.5s") == 9_910_500_000_000
    assert call("time.parse_duration_ns", "0") == 0
    with pytest.raises(BuiltinError, match="unknown unit"):
        call("time.parse_duration_ns", "3 weeks")
    assert call("time.parse_ns", "2006-01-02", "2022-12-31") == 1672444800000000000
    assert call("time.parse_ns", "RFC822Z", "02 Jan 06 15:04 -0700") == 1136239440000000000
    assert call("time.parse_ns", "Mon Jan _2 15:04:05 MST 2006", "Tue Feb  7 13:04:05 UTC 2023") == \
        1675775045000000000
    assert call("time.parse_ns", "2006-01-02T15:04:05Z07:00", "2023-02-07T13:04:05.5+01:00") == 1675771445500000000
    with pytest.raises(BuiltinError, match="cannot parse"):
        call("time.parse_ns", "2006-01-02", "31/12/2022")
    ns = 1677600000123456789
    assert call("time.format", ns) == "2023-02-28T16:00:00.123456789Z"
    assert call("time.format", [ns, "America/New_York", "Mon Jan _2 15:04:05 MST 2006"]) == \
        "Tue Feb 28 11:00:00 EST 2023"
    assert call("time.format", [0, "UTC", "RFC822"]) == "01 Jan 70 00:00 UTC"
    assert call("time.format", [1_500_000_000, "", "15:04:05.000 PM"]) == "00:00:01.500 AM"
    assert isinstance(call("time.now_ns"), int)
