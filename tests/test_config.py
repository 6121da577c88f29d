import pytest

from kwserver.config import (
    ConfigError,
    PolicyGroupSpec,
    PolicySpec,
    ServerSettings,
    load_policies,
    parse_bool,
    parse_policies,
)


@pytest.mark.parametrize("settings_yaml", ["", "settings:", "settings: {}", "settings: null"])
def test_missing_or_null_settings_become_empty_map(tmp_path, settings_yaml):
    path = tmp_path / "policies.yml"
    path.write_text(f"p:\n  module: file:///p.wasm\n  {settings_yaml}\n")
    assert load_policies(path)["p"].settings == {}


def test_full_policy_entry():
    entry = parse_policies({
        "psp-capabilities": {
            "module": "file:///c.wasm", "policyMode": "monitor", "allowedToMutate": True,
            "message": "custom", "timeoutEvalSeconds": 5, "unknownKey": "ignored",
            "contextAwareResources": [{"apiVersion": "v1", "kind": "Namespace"}],
            "settings": {"allowed_capabilities": ["*"]},
        }
    })["psp-capabilities"]
    assert isinstance(entry, PolicySpec)
    assert (entry.policy_mode, entry.allowed_to_mutate, entry.message, entry.timeout_eval_seconds) == (
        "monitor", True, "custom", 5)
    assert entry.context_aware_resources[0].kind == "Namespace"
    assert entry.warnings == ("policy 'psp-capabilities': unknown key `unknownKey` is ignored",)


@pytest.mark.parametrize("doc,warning", [
    # A misspelt key: the closest known one is named, whatever the case.
    ({"p": {"module": "x", "policymode": "monitor"}},
     "policy 'p': unknown key `policymode` is ignored; did you mean `policyMode`?"),
    ({"p": {"module": "x", "allowedToMutat": True}},
     "policy 'p': unknown key `allowedToMutat` is ignored; did you mean `allowedToMutate`?"),
    ({"g": {"expression": "a()", "message": "m", "polices": {}, "policies": {"a": {"module": "x"}}}},
     "policy group 'g': unknown key `polices` is ignored; did you mean `policies`?"),
    # Members follow the same rule (the reference refuses their unknown keys: see docs/compatibility.md).
    ({"g": {"expression": "a()", "message": "m", "policies": {"a": {"module": "x", "setings": {"k": 1}}}}},
     "policy group 'g' member 'a': unknown key `setings` is ignored; did you mean `settings`?"),
    ({"g": {"expression": "a()", "message": "m", "policies": {"a": {"module": "x", "policyMode": "monitor"}}}},
     "policy group 'g' member 'a': unknown key `policyMode` is ignored: a member has no mode of its own: "
     "the group's `policyMode` applies"),
])
def test_unknown_keys_are_ignored_with_a_warning(doc, warning):
    from kwserver.config import entry_warnings

    assert entry_warnings(parse_policies(doc)) == [warning]


def test_keys_the_controller_writes_are_not_warned_about():
    from kwserver.config import entry_warnings

    doc = {"p": {"namespacedName": {"Namespace": "", "Name": "p"}, "module": "x", "hostCapabilities": ["*"]},
           "g": {"namespacedName": {"Namespace": "", "Name": "g"}, "expression": "a()", "message": "m",
                 "policies": {"a": {"module": "x", "hostCapabilities": []}}}}
    assert entry_warnings(parse_policies(doc)) == []


def test_defaults():
    entry = parse_policies({"p": {"module": "file:///p.wasm"}})["p"]
    assert (entry.policy_mode, entry.allowed_to_mutate, entry.message, entry.timeout_eval_seconds) == (
        "protect", False, None, None)


def test_group_members_get_qualified_ids():
    group = parse_policies({"g": {
        "expression": "a() && b()", "message": "no", "policyMode": "monitor",
        "policies": {"a": {"module": "x.wasm"}, "b": {"module": "y.wasm", "timeoutEvalSeconds": 3}},
    }})["g"]
    assert isinstance(group, PolicyGroupSpec)
    assert group.members["b"].name == "g/b"
    assert group.members["b"].timeout_eval_seconds == 3
    assert group.policy_mode == "monitor"


@pytest.mark.parametrize("doc,message", [
    ({"a/b": {"module": "x"}}, "policy name 'a/b' contains a '/' character"),
    ({"g": {"expression": "true", "message": "m", "policies": {"a/b": {"module": "x"}}}},
     "policy group 'g' contains policies with invalid names: ['a/b']"),
    ({"g": {"expression": "missing() && true", "message": "m", "policies": {"a": {"module": "x"}}}},
     "invalid expression"),
    ({"g": {"expression": "a()", "policies": {"a": {"module": "x"}}}}, "missing field"),
    ({"p": {"module": "x", "policyMode": "Protect"}}, "unknown variant"),
    ({"p": {"module": "x", "settings": [1, 2]}}, "settings must be a map"),
    ({"p": {"module": "x", "timeoutEvalSeconds": -1}}, "unsigned integer"),
])
def test_invalid_policies(doc, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_policies(doc)


def test_unreadable_file_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match=r'error while loading policies from ".*missing\.yml"'):
        load_policies(tmp_path / "missing.yml")


@pytest.mark.parametrize("text,value", [("true", True), ("1", True), ("Yes", True), ("off", False), ("0", False)])
def test_boolean_env_values(text, value):
    assert parse_bool(text) is value


def test_env_and_flags():
    settings = ServerSettings.from_env({"KUBEWARDEN_PORT": "4000", "KUBEWARDEN_CONTINUE_ON_ERRORS": "true"},
                                       workers=3)
    assert (settings.port, settings.continue_on_errors, settings.workers) == (4000, True, 3)
    assert ServerSettings.from_env(settings.to_env()) == settings


def test_tls_argument_rules():
    with pytest.raises(ConfigError, match="both certificate and key must be provided together"):
        ServerSettings(cert_file="c.pem")
    with pytest.raises(ConfigError, match="client CA certificate requires server certificate and key"):
        ServerSettings(client_ca_file="ca.pem")
    assert ServerSettings(cert_file="c", key_file="k", client_ca_file="a.pem, b.pem").client_ca_files == [
        "a.pem", "b.pem"]


def test_global_timeout_disabled():
    assert ServerSettings(disable_timeout_protection=True).global_timeout is None
    assert ServerSettings(policy_timeout=7).global_timeout == 7


def test_reference_flags_are_accepted():
    settings = ServerSettings.from_env({"KUBEWARDEN_SOURCES_PATH": "sources.yml", "KUBEWARDEN_ENABLE_METRICS": "1",
                                        "NO_COLOR": "anything", "KUBEWARDEN_SIGSTORE_CACHE_DIR": "x"})
    assert settings.log_no_color is True
    # --enable-metrics has an effect (OTLP push), so only the sigstore cache is named as ignored.
    assert settings.enable_metrics is True
    assert [note.split(":")[0] for note in settings.ignored()] == ["sigstore-cache-dir"]


def test_reference_flags_on_the_command_line():
    from kwserver.commands.cli import build_parser
    from kwserver.config import settings_from_args

    args = build_parser().parse_args(["serve", "--sources-path", "s.yml", "--enable-metrics", "--log-no-color",
                                      "--docker-config-json-path", "d", "--enable-pprof"])
    settings = settings_from_args(args, environ={})
    assert settings.sources_path == "s.yml" and settings.enable_metrics and settings.log_no_color


def test_every_setting_is_one_flag_one_variable_and_one_default():
    from kwserver.commands.cli import build_parser
    from kwserver.config import SETTINGS, help_text, settings_from_args

    assert len({s.env for s in SETTINGS}) == len({s.flag for s in SETTINGS}) == len(SETTINGS)
    defaults = ServerSettings()
    for setting in SETTINGS:
        assert getattr(defaults, setting.name) == setting.default, setting.name
        if setting.default is not None and not setting.is_bool:
            assert f"default: {setting.default}" in help_text(setting), setting.name
            text = str(setting.default)
            from_flag = settings_from_args(build_parser().parse_args(["serve", setting.flag, text]), environ={})
            from_env = ServerSettings.from_env({setting.env: text})
            assert getattr(from_flag, setting.name) == getattr(from_env, setting.name) == setting.default
        elif setting.is_bool:
            from_flag = settings_from_args(build_parser().parse_args(["serve", setting.flag]), environ={})
            assert getattr(from_flag, setting.name) is True
            assert getattr(ServerSettings.from_env({setting.env: "1"}), setting.name) is True


@pytest.mark.parametrize("overrides,message", [
    ({"port": 70000}, "port: 70000 is not a TCP port number"),
    ({"max_connections_per_worker": 0}, "max-connections-per-worker: must be at least 1, got 0"),
    ({"header_timeout_seconds": 0}, "header-timeout-seconds: must be above 0, got 0"),
    ({"workers": 0}, "workers: must be at least 1, got 0"),
    ({"instance_keep_memory_mib": -1}, "instance-keep-memory-mib: must be at least 0, got -1"),
    ({"log_level": "verbose"}, "log-level: invalid value 'verbose', expected one of trace, debug, info, warn, error"),
    ({"log_fmt": "xml"}, "log-fmt: invalid value 'xml', expected one of text, json"),
    ({"min_workers": 3, "max_workers": 2}, r"min_workers \(3\) is above max_workers \(2\)"),
])
def test_each_setting_checks_its_own_range(overrides, message):
    with pytest.raises(ConfigError, match=message):
        ServerSettings(**overrides)


def test_help_shows_defaults_and_variables():
    from kwserver.commands.cli import build_parser

    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    text = " ".join(serve.format_help().split())
    assert "Port of the admission API [default: 3000, env: KUBEWARDEN_PORT]" in text
    assert "busier than 75% [default: 3, env: KWSERVER_SCALE_UP_AFTER_SECONDS]" in text
