"""Every user error on the command line is one `error:` line on stderr with exit status 2, never a
traceback; `policy show` takes only the options it uses; `compress` writes every file with one mode."""

from __future__ import annotations

import socket
import stat

import pytest

from moeserve.cli import main


def one_error_line(capsys, argv: list[str]) -> str:
    """Progress bars may come before it; the error itself is the one last line."""
    capsys.readouterr()
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse's own errors
        status = exc.code
    assert status == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    errors = [line for line in lines if "error" in line.lower()]
    assert errors == [lines[-1]] and lines[-1].startswith("error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    return lines[-1]


@pytest.mark.parametrize("port", ["99999", "0", "-1"])
def test_serve_port_out_of_range(capsys, port):
    assert "--port" in one_error_line(capsys, ["serve", "--port", port])


def test_serve_port_in_use(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert "already in use" in one_error_line(capsys, ["serve", "--port", str(port)])


def test_serve_unknown_host(capsys):
    assert "--host" in one_error_line(capsys, ["serve", "--host", "no-such-host.invalid", "--port", "8123"])


@pytest.mark.parametrize("budget", ["200%", "100.5%", "inf%", "nan%", "bogus", "0"])
def test_expert_cache_out_of_range(capsys, checkpoint_factory, budget):
    directory, _ = checkpoint_factory("qwen3_moe", tokenizer=True)
    line = one_error_line(capsys, ["generate", "--model", str(directory), "--expert-cache", budget, "hello"])
    assert "expert cache size" in line


@pytest.mark.parametrize("depth", ["0", "-2", "two"])
def test_prefetch_depth_must_be_a_positive_number(capsys, checkpoint_factory, depth):
    directory, _ = checkpoint_factory("qwen3_moe", tokenizer=True)
    line = one_error_line(capsys, ["generate", "--model", str(directory), "--prefetch-depth", depth, "hello"])
    assert "--prefetch-depth" in line and "positive number of MoE layers" in line


def test_prefetch_depth_without_prefetch(capsys, checkpoint_factory):
    directory, _ = checkpoint_factory("qwen3_moe", tokenizer=True)
    argv = ["generate", "--model", str(directory), "--no-prefetch", "--prefetch-depth", "2", "hello"]
    assert "prefetch turned off" in one_error_line(capsys, argv)


def test_policy_show_takes_only_the_options_it_uses(capsys, checkpoint_factory, tmp_path):
    directory, _ = checkpoint_factory("qwen3_moe", tokenizer=True)
    policy = tmp_path / "policy.yaml"
    policy.write_text("default: {codec: szp, mode: rel, error_bound: 1.0e-2}\nrules:\n  - {layers: '1', codec: raw}\n")
    for option in (["--expert-cache", "bogus"], ["--policy", str(policy)], ["--eviction", "lfu"], ["--no-prefetch"],
                   ["--prefetch-depth", "2"]):
        one_error_line(capsys, ["policy", "show", "--model", str(directory), *option, str(policy)])
    assert main(["policy", "show", "--model", str(directory), str(policy)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1].split()[:2] == ["0", "szp"] and table[2].split()[:2] == ["1", "raw"]


def test_unknown_command_and_option(capsys):
    one_error_line(capsys, ["bogus"])
    one_error_line(capsys, ["generate", "--no-such-option", "x"])


def test_compress_writes_every_file_with_the_same_mode(checkpoint_factory, tmp_path):
    directory, _ = checkpoint_factory("qwen3_moe", tokenizer=True)
    policy = tmp_path / "policy.yaml"
    policy.write_text("default: {codec: szp, mode: rel, error_bound: 1.0e-2}\n")
    out = tmp_path / "compressed"
    assert main(["compress", "--model", str(directory), "--policy", str(policy), "--out", str(out)]) == 0
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in out.iterdir()}
    assert "resident.safetensors" in modes and len(set(modes.values())) == 1, modes
