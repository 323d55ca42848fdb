"""The per-layer error-bound policy: schema errors with their lines, groups, precedence, fingerprints, docs."""

from __future__ import annotations

import re
import textwrap
import time
from pathlib import Path

import pytest

from moeserve import codecs
from moeserve.errors import MoeServeError
from moeserve.offload.policy import (
    PROJECTIONS,
    Policy,
    PolicyError,
    ResolvedPolicy,
    TensorSetting,
    load_policy,
)
from moeserve.offload.yaml_locations import MAX_CHARS, MAX_NODES
from policy_bombs import DEEP_NESTING, alias_bomb

DOCS = Path(__file__).resolve().parents[1] / "docs" / "policy.md"


def _docs_examples() -> list[str]:
    return [block for _, block in re.findall(r"```(yaml|json)\n(.*?)```", DOCS.read_text(), flags=re.S)]


EXAMPLE = _docs_examples()[0]  # the docs' first example: the tests below pin what it resolves to
SZP = TensorSetting("szp", "rel", 1e-3)
RAW = TensorSetting("raw", "none", None)


def _policy(text: str) -> Policy:
    return load_policy(textwrap.dedent(text))


def _error(source, *fragments: str, line: int | None = None, resolve_on=None) -> PolicyError:
    """The PolicyError that loading (and resolving, given a model shape) raises; checks its form."""
    with pytest.raises(PolicyError) as caught:
        policy = load_policy(textwrap.dedent(source) if isinstance(source, str) else source)
        if resolve_on is not None:
            policy.resolve(*resolve_on)
    exc = caught.value
    message = str(exc)
    assert isinstance(exc, MoeServeError) and "\n" not in message and message.endswith("."), message
    for fragment in fragments:
        assert fragment in message, message
    assert exc.line == line, message
    if line is not None:
        assert f"line {line}, column {exc.column}:" in message
    return exc


# --- schema errors, each at its line --------------------------------------------------------------------


def test_unknown_codec_lists_the_known_ones():
    exc = _error("default: {codec: szx, error_bound: 1.0e-3}\n", "default.codec", "'szx'", line=1)
    assert ", ".join(codecs.names()) in str(exc) and exc.path == "default.codec" and exc.column == 11


@pytest.mark.parametrize(
    "value, fragment",
    [("-1.0e-3", "above 0"), ("0", "above 0"), (".nan", "above 0"), (".inf", "above 0"), ("abc", "a number"),
     ("true", "a number"), ("[1]", "a number")],
)
def test_bad_error_bound(value, fragment):
    source = f"""\
        default: {{codec: szp, error_bound: 1.0e-3}}
        rules:
          - {{layers: 0, codec: raw}}
          - layers: 1
            error_bound: {value}
        """
    exc = _error(source, "rules[1].error_bound", fragment, line=5)
    assert exc.column == 5


def test_unknown_mode_and_key_and_wrong_types():
    _error("default: {codec: szp, mode: relative, error_bound: 1.0e-3}\n", "default.mode", "mean_abs", line=1)
    _error("default:\n  codec: szp\n  error_bound: 1.0e-3\n  eb: 3\n", "default.eb is not a known key", line=4)
    _error("default: {codec: raw}\nrules:\n- {layers: 1, codec: raw, level: 3}\n", "rules[0].level", line=3)
    _error("default: {codec: raw}\nextra: 1\n", "extra is not a known key; use default, rules", line=2)
    _error("default: {codec: raw}\nrules: {codec: raw}\n", "rules must be a list", line=2)
    _error("default: {codec: raw}\nrules:\n  - [1]\n", "rules[0] must be a mapping", line=3)
    _error("default: szp\n", "default must be a mapping", line=1)
    _error("default: {codec: 3}\n", "default.codec", "got 3", line=1)
    _error("default: {codec: raw}\nrules:\n  - {layers: 1.5, codec: raw}\n", "rules[0].layers", "1.5", line=3)
    _error("default: {codec: raw}\nrules:\n  - {projections: [gate, mid], codec: raw}\n", "'mid'", line=3)
    _error("default: {codec: raw}\nrules:\n  - {experts: shallow, codec: raw}\n", "rules[0].experts", line=3)


def test_bad_ranges():
    _error("default: {codec: raw}\nrules:\n  - layers: 5-2\n    codec: raw\n", "'5-2'", 'write "2-5"', line=3)
    _error("default: {codec: raw}\nrules:\n  - {layers: -1, codec: raw}\n", "ids start at 0", line=3)
    _error("default: {codec: raw}\nrules:\n  - {layers: [], codec: raw}\n", "empty list", line=3)
    _error("default: {codec: raw}\nrules:\n  - {layers: 1-x, codec: raw}\n", "'1-x'", line=3)


def test_missing_and_contradictory_settings():
    _error("default: {codec: szp}\n", "default uses codec szp, which needs an error_bound", line=1)
    _error("default: {codec: raw, error_bound: 1.0e-3}\n", "codec raw takes no error_bound", line=1)
    _error("default: {codec: int8, mode: abs}\n", "codec int8 takes no mode", line=1)
    _error("rules: []\n", "default is missing", line=1)
    _error("Default: {codec: raw}\n", "Default is not a known key", line=1)  # the typo, not the missing key
    _error("default: {mode: abs}\n", "default.codec is missing", line=1)
    _error("default: {codec: raw}\nrules:\n  - {layers: 3}\n", "rules[0] changes nothing", line=3)
    _error("default: {codec: raw}\nrules:\n  - {layers: 3, codec: raw, error_bound: 1.0e-2}\n", "takes no", line=3)


def test_text_level_errors():
    _error("", "the policy is empty")
    _error("- 1\n- 2\n", "must be a mapping with the keys default and rules", line=1)
    _error("default: {codec: raw}\ndefault: {codec: szp}\n", "default appears twice", line=2)
    _error("default: {codec: raw}\nrules:\n  - {codec: raw, codec: szp}\n", "rules[0].codec appears twice", line=3)
    _error("default: {codec: raw\n", "not valid YAML", line=2)
    _error("default: !!python/object:os.system {codec: raw}\n", "not valid YAML", line=1)


def test_dict_errors_name_the_key_path_only():
    exc = _error({"default": {"codec": "szp", "error_bound": -1}}, "policy: default.error_bound", "above 0")
    assert exc.path == "default.error_bound" and "line" not in str(exc)


def test_file_errors_name_the_file(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("default: {codec: szp, error_bound: 1.0e-3}\nrules:\n  - {layers: deep, mode: absolute}\n")
    _error(str(path), f"policy file {path}, line 3", "rules[0].mode", line=3)
    _error(tmp_path / "missing.yml", "missing.yml does not exist")
    # JSON is YAML but for tab indentation, which JSON files often use: lines are still reported.
    json_path = tmp_path / "p.json"
    json_path.write_text('{\n\t"default": {\n\t\t"codec": "szp",\n\t\t"error_bound": -1e-3\n\t}\n}\n')
    _error(json_path, "p.json, line 4", "default.error_bound", line=4)


# --- hostile texts (issue 26): refused at once, wherever a policy is read ----------------------------------


def _refused_at_once(source, *fragments: str, line: int | None = None) -> PolicyError:
    start = time.perf_counter()
    exc = _error(source, *fragments, line=line)
    assert time.perf_counter() - start < 1.0
    return exc


def test_anchors_and_aliases_are_refused_before_anything_expands():
    _refused_at_once(alias_bomb(7), "line 2, column 5: the anchor &a0 is not allowed", "write each value out", line=2)
    _refused_at_once(alias_bomb(8), "the anchor &a0", line=2)
    _refused_at_once("default: {codec: raw}\nrules:\n  - {layers: *x, codec: raw}\n", "the alias *x is not allowed", line=3)


@pytest.mark.parametrize("text", DEEP_NESTING.values(), ids=DEEP_NESTING.keys())
def test_deep_nesting_is_an_error_not_a_recursion_error(text):
    _refused_at_once(text, "policy text, line 1", "nest", line=1)


def test_size_and_value_count_are_bounded():
    _refused_at_once("default: {codec: raw}\n#" + "x" * MAX_CHARS, f"more than the {MAX_CHARS} a policy may have")
    many = "default: {codec: raw}\nrules:\n  - {layers: [" + "0, " * MAX_NODES + "0], codec: raw}\n"
    _refused_at_once(many, f"holds more than {MAX_NODES} values", line=3)
    start = time.perf_counter()  # just under the bound: read, and fast
    policy = load_policy("default: {codec: raw}\nrules:\n  - {layers: [" + "0, " * (MAX_NODES - 21) + "0], codec: int8}\n")
    assert len(policy.rules[0].layers) == MAX_NODES - 20 and time.perf_counter() - start < 1.0


def test_policy_files_are_held_to_the_same_bounds(tmp_path, capsys):
    from moeserve.cli import main

    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb(7))
    assert main(["policy", "show", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: policy file {path}, line 2, column 5: the anchor &a0"), err


# --- resolve-time (model-aware) errors ------------------------------------------------------------------

DENSE_MIXED = ([1, 3, 5, 7, 9, 11], 12, 8)  # moe_layers, num_layers, num_experts


@pytest.mark.parametrize(
    "rule, fragment",
    [
        ("{layers: 40, codec: raw}", "names layer 40, but the model's layers are 0-11"),
        ("{layers: 0-12, codec: raw}", "names layer 12"),
        ("{layers: 2, codec: raw}", "layer 2, a dense layer without experts; the MoE layers are 1, 3, 5, 7, 9, 11"),
        ("{layers: [1, 4-4], codec: raw}", "layer 4, a dense layer"),
        ("{experts: 8, codec: raw}", "rules[1].experts names expert 8, but each MoE layer has experts 0-7"),
        ("{experts: [0, 6-9], codec: raw}", "expert 9"),
    ],
)
def test_ids_the_model_does_not_have(rule, fragment):
    source = f"default: {{codec: raw}}\nrules:\n  - {{layers: all, codec: raw}}\n  - {rule}\n"
    _error(source, fragment, line=4, resolve_on=DENSE_MIXED)


def test_bound_on_an_unbounded_tensor_fails_at_the_rule():
    source = """\
        default: {codec: szp, error_bound: 1.0e-3}
        rules:
          - {layers: 3, codec: raw}
          - {layers: all, error_bound: 1.0e-2}
        """
    exc = _error(source, "rules[1].error_bound", "layer 3 expert 0 gate", "codec raw", line=4, resolve_on=DENSE_MIXED)
    assert exc.column == 19
    source = "default: {codec: raw}\nrules:\n  - {projections: up, mode: abs}\n"
    _error(source, "rules[0].mode", "layer 1 expert 0 up", line=3, resolve_on=DENSE_MIXED)


def test_switching_from_raw_needs_a_bound():
    source = "default: {codec: szp, error_bound: 1.0e-3}\nrules:\n  - {layers: 5, codec: raw}\n  - {codec: zfp}\n"
    _error(source, "rules[1].codec switches layer 5 expert 0 gate from raw to zfp", line=4, resolve_on=DENSE_MIXED)


def test_nothing_is_half_applied():
    good = _policy(EXAMPLE)
    before = good.resolve(list(range(24)), 24, 4)
    rules = [{"layers": 1, "codec": "raw"}, {"experts": 9, "codec": "raw"}]  # the second does not fit
    with pytest.raises(PolicyError):
        load_policy({"default": {"codec": "szp", "error_bound": 1e-3}, "rules": rules}).resolve(list(range(24)), 24, 4)
    assert good.resolve(list(range(24)), 24, 4) == before
    with pytest.raises(AttributeError):
        good.rules = ()  # frozen: nobody can patch a policy in place
    with pytest.raises(TypeError):
        before.settings[(0, 0, "up")] = SZP  # nor a resolved one


# --- groups ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "moe_layers, shallow, middle, deep",
    [
        (list(range(8)), [0, 1, 2], [3, 4, 5], [6, 7]),
        (list(range(10)), [0, 1, 2], [3, 4, 5, 6], [7, 8, 9]),
        (list(range(24)), list(range(8)), list(range(8, 16)), list(range(16, 24))),
        (list(range(1, 24, 2)), [1, 3, 5, 7], [9, 11, 13, 15], [17, 19, 21, 23]),
        ([2, 5, 9, 11, 12], [2, 5], [9, 11], [12]),
        ([4], [], [4], []),
        ([4, 6], [4], [6], []),
    ],
)
def test_groups_are_thirds_of_the_moe_layers(moe_layers, shallow, middle, deep):
    policy = _policy("""\
        default: {codec: szp, error_bound: 1.0e-3}
        rules:
          - {layers: shallow, codec: raw}
          - {layers: middle, codec: int8}
          - {layers: deep, codec: int4}
        """)
    resolved = policy.resolve(moe_layers, max(moe_layers) + 1, 2)
    assert resolved.groups == {"shallow": tuple(shallow), "middle": tuple(middle), "deep": tuple(deep)}
    for codec, layers in (("raw", shallow), ("int8", middle), ("int4", deep)):
        assert all(resolved.setting(x, 1, "up").codec == codec for x in layers)


# --- precedence and inheritance -------------------------------------------------------------------------


def test_docs_example_resolves_as_documented():
    resolved = _policy(EXAMPLE).resolve(list(range(32)), 32, 8)
    for layer in range(32):
        expected = TensorSetting("szp", "rel", 1e-2) if layer < 10 else RAW if layer <= 17 else SZP
        assert resolved.layer_settings(layer) == [expected], layer


def test_experts_and_projections_and_inheritance():
    policy = _policy("""\
        default: {codec: szp, mode: abs, error_bound: 1.0e-3}
        rules:
          - {experts: "2-3", projections: down, codec: zfp}        # keeps abs and 1e-3
          - {experts: 3, mode: mean_abs}                             # all three projections of expert 3
          - {layers: 5, projections: [gate, up], codec: raw}
          - {layers: 5, projections: up, codec: sz3, error_bound: 1e-2}   # from raw: mode rel, not abs
        """)
    r = policy.resolve([1, 3, 5], 6, 4)
    assert r.setting(1, 0, "down") == TensorSetting("szp", "abs", 1e-3)
    assert r.setting(1, 2, "down") == TensorSetting("zfp", "abs", 1e-3)
    assert r.setting(1, 3, "down") == TensorSetting("zfp", "mean_abs", 1e-3)
    assert r.setting(1, 3, "gate") == TensorSetting("szp", "mean_abs", 1e-3)
    assert r.setting(5, 0, "gate") == RAW
    assert r.setting(5, 0, "up") == TensorSetting("sz3", "rel", 1e-2)  # 1e-2 written without a dot: a YAML string
    assert r.setting(5, 3, "down") == TensorSetting("zfp", "mean_abs", 1e-3)
    assert r.layer_settings(5)[:2] == [RAW, TensorSetting("sz3", "rel", 1e-2)]


def test_later_rules_win():
    policy = _policy("""\
        default: {codec: szp, error_bound: 1.0e-3}
        rules:
          - {layers: "0-5", error_bound: 1.0e-2}
          - {layers: [2, deep], error_bound: 5.0e-4}
          - {layers: 2, experts: 0, codec: raw}
        """)
    r = policy.resolve(list(range(6)), 6, 2)
    assert [r.setting(x, 1, "gate").error_bound for x in range(6)] == [1e-2, 1e-2, 5e-4, 1e-2, 5e-4, 5e-4]
    assert r.setting(2, 0, "down") == RAW


def test_default_policy_is_raw_everywhere():
    r = Policy.default_policy().resolve([0, 2], 3, 4)
    assert isinstance(r, ResolvedPolicy) and set(r.settings.values()) == {RAW}
    assert r.settings.keys() == {(x, e, p) for x in (0, 2) for e in range(4) for p in PROJECTIONS}
    assert Policy.default_policy() == load_policy({"default": {"codec": "raw"}})


def test_setting_of_a_tensor_the_model_lacks():
    r = Policy.default_policy().resolve([0, 2], 3, 4)
    for args in ((1, 0, "up"), (0, 4, "up"), (0, 0, "w1")):
        with pytest.raises(ValueError):
            r.setting(*args)
    with pytest.raises(ValueError):
        r.layer_settings(1)


# --- sources, fingerprint, round trip -------------------------------------------------------------------


def test_sources(tmp_path):
    policy = _policy(EXAMPLE)
    (tmp_path / "p.yml").write_text(EXAMPLE)
    assert load_policy(str(tmp_path / "p.yml")) == load_policy(tmp_path / "p.yml") == policy
    assert load_policy(policy) is policy
    as_dict = {"default": {"codec": "szp", "mode": "rel", "error_bound": 1e-3},
               "rules": [{"layers": "shallow", "error_bound": 1e-2}, {"layers": "10-17", "codec": "raw"}]}
    assert load_policy(as_dict) == policy
    assert load_policy("default: {codec: raw}\nrules:\n") == Policy.default_policy()  # `rules:` left empty


def test_fingerprint_depends_only_on_the_resolved_settings():
    shape = (list(range(1, 24, 2)), 24, 8)
    block = """\
        default:
          codec: szp
          mode: rel
          error_bound: 1.0e-3
        rules:
          - layers: [shallow]
            error_bound: "1e-2"
          - layers: [11, "13 - 17"]
            codec: raw
          - {layers: "11-11", projections: [down, gate, up], codec: raw}   # redundant
        """
    same = [_policy(EXAMPLE), _policy(block), load_policy(_policy(EXAMPLE).to_yaml())]
    prints = {p.resolve(*shape).fingerprint() for p in same}
    assert len(prints) == 1 and re.fullmatch(r"[0-9a-f]{64}", prints.pop())
    assert _policy(EXAMPLE).resolve(*shape).fingerprint() == _policy(EXAMPLE).resolve(*shape).fingerprint()
    looser = _policy(EXAMPLE.replace("1.0e-3", "2.0e-3"))
    other_mode = _policy(EXAMPLE.replace("mode: rel", "mode: abs"))
    other_shape = (list(range(1, 24, 2)), 24, 16)
    fingerprints = {
        _policy(EXAMPLE).resolve(*shape).fingerprint(),
        looser.resolve(*shape).fingerprint(),
        other_mode.resolve(*shape).fingerprint(),
        _policy(EXAMPLE).resolve(*other_shape).fingerprint(),
    }
    assert len(fingerprints) == 4


def test_to_yaml_round_trips():
    policy = _policy("""\
        default: {codec: zfp, mode: mean_abs, error_bound: 1e-4}
        rules:
          - {layers: [0, "3-5", middle], experts: [1, "4-6"], projections: [up, gate], codec: int8}
          - {layers: all, experts: all, projections: down, error_bound: 2.5e-4}
          - {layers: "7", codec: raw}
        """)
    text = policy.to_yaml()
    again = load_policy(text)
    assert again == policy and again.to_yaml() == text
    assert again.resolve(list(range(9)), 9, 8).fingerprint() == policy.resolve(list(range(9)), 9, 8).fingerprint()
    assert load_policy(Policy.default_policy().to_yaml()) == Policy.default_policy()


def test_docs_examples_parse():
    examples = _docs_examples()
    assert len(examples) >= 3
    for example in examples:
        load_policy(example).resolve(list(range(24)), 24, 64)
