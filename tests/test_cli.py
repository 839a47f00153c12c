"""The qwen-native command line: end to end in a subprocess on a tiny model, and bad input (one line on stderr,
non-zero exit, no traceback)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

import qwen_native
from conftest import make_hf_cache
from qwen_native import cli

GREEDY = ["--temperature", "0", "--repeat-penalty", "1", "--threads", "1"]


def run(*args, stdin=None, env=None, timeout=120):
    e = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    e.update(PYTHONIOENCODING="utf-8", HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "qwen_native", *args], input=stdin, capture_output=True,
                          text=True, encoding="utf-8", env=e, timeout=timeout,
                          stdin=None if stdin is not None else subprocess.DEVNULL)


def expected_text(model_dir, prompt, n, **kw):
    with qwen_native.load(model_dir, num_threads=1) as m:
        return m.generate(prompt, max_new_tokens=n, do_sample=False, repetition_penalty=1.0, **kw).text


def test_end_to_end(tiny_dir):
    p = run("--model", str(tiny_dir), "--prompt", "Tell me a story", "-n", "12", *GREEDY)
    assert p.returncode == 0, p.stderr
    assert p.stdout == expected_text(tiny_dir, "Tell me a story", 12) + "\n"
    err = p.stderr
    assert "Traceback" not in err
    assert "loaded" in err and " s (" in err          # load time
    assert "prefill" in err and "decode" in err and err.count("tok/s") == 2  # two separate rates


def test_stdin_system_and_raw_prompt(tiny_dir):
    p = run("--model", str(tiny_dir), "-n", "6", "--system", "Be brief.", *GREEDY, stdin="Tell me a story")
    assert p.returncode == 0, p.stderr
    assert p.stdout == expected_text(tiny_dir, "Tell me a story", 6, system="Be brief.") + "\n"
    p = run("--model", str(tiny_dir), "-p", "Once upon", "-n", "6", "--no-chat-template", "-q", *GREEDY)
    assert p.returncode == 0, p.stderr
    assert p.stdout == expected_text(tiny_dir, "Once upon", 6, chat_template=False) + "\n"
    assert p.stderr == ""


def test_hub_cache_through_env(tiny_dir, tmp_path):
    cache = tmp_path / "cache"
    make_hf_cache(cache, "org/tiny", tiny_dir, commit="c" * 40)
    p = run("--model", "org/tiny", "-p", "Tell me a story", "-n", "4", *GREEDY, env={"HF_HUB_CACHE": str(cache)})
    assert p.returncode == 0, p.stderr
    assert p.stdout == expected_text(tiny_dir, "Tell me a story", 4) + "\n"
    p = run("--model", "org/absent", "-p", "hi", env={"HF_HUB_CACHE": str(cache)})
    assert p.returncode == 1
    assert p.stderr.count("\n") == 1 and "HF_HUB_OFFLINE" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize("args, code, words", [
    (["--model", "/no/such/dir", "-p", "hi"], 1, "no such directory"),
    (["--temperature", "-1", "-p", "hi"], 1, "temperature"),
    (["--top-p", "1.5", "-p", "hi"], 1, "top_p"),
    (["--top-k", "x", "-p", "hi"], 2, "--top-k"),
    (["-n", "0", "-p", "hi"], 2, "--sample-len"),
    (["--bogus-flag"], 2, "unrecognized"),
    (["--model", "{tiny}", "--dtype", "float16", "-p", "hi"], 1, "float16"),
    (["--model", "{tiny}", "--device", "tpu", "-p", "hi"], 1, "device"),
    (["--model", "{tiny}"], 2, "prompt"),                       # stdin is empty
    (["--model", "{tiny}", "-p", "hi", "-n", "100000"], 1, "max_new_tokens"),
])
def test_bad_input_one_line(tiny_dir, args, code, words):
    args = [a.replace("{tiny}", str(tiny_dir)) for a in args]
    p = run(*args)
    assert p.returncode == code, (p.stdout, p.stderr)
    lines = [line for line in p.stderr.splitlines() if not line.startswith("loaded ")]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("qwen-native: error:") and words in lines[0]
    assert "Traceback" not in p.stderr


def test_console_script(tiny_dir):
    exe = shutil.which("qwen-native")
    if exe is None:
        pytest.skip("the qwen-native console script is not installed in this environment")
    p = subprocess.run([exe, "--model", str(tiny_dir), "-p", "Tell me a story", "-n", "3", "-q", *GREEDY],
                       capture_output=True, text=True, encoding="utf-8", timeout=120,
                       env=dict(os.environ, PYTHONIOENCODING="utf-8"))
    assert p.returncode == 0, p.stderr
    assert p.stdout == expected_text(tiny_dir, "Tell me a story", 3) + "\n"


# -- in process (fast) ------------------------------------------------------------------------------------------------


def test_main_in_process(tiny_dir, capsys):
    assert cli.main(["--model", str(tiny_dir), "-p", "Tell me a story", "-n", "5", "--stop", "\x00", *GREEDY]) == 0
    out, err = capsys.readouterr()
    assert out == expected_text(tiny_dir, "Tell me a story", 5) + "\n"
    assert "finish: length" in err


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert qwen_native.__version__ in capsys.readouterr().out


def test_keyboard_interrupt_exits_130(tiny_dir, capsys, monkeypatch):
    def boom(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(qwen_native.Model, "generate", boom)
    assert cli.main(["--model", str(tiny_dir), "-p", "hi", "-q"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err


def test_unexpected_error_is_one_line(tiny_dir, capsys, monkeypatch):
    def boom(*a, **kw):
        raise KeyError("weird\nmultiline")

    monkeypatch.setattr(qwen_native.Model, "generate", boom)
    assert cli.main(["--model", str(tiny_dir), "-p", "hi", "-q"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("qwen-native: error: KeyError")


def test_model_shorthand():
    assert cli._model_name("1.5b") == "Qwen/Qwen2.5-1.5B-Instruct"
    assert cli._model_name("2.5-coder-0.5b") == "Qwen/Qwen2.5-Coder-0.5B-Instruct"
    assert cli._model_name("org/name") == "org/name"
