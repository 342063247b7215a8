"""W&B never stops a run (loran/pipeline/tracking.py): a bounded online start, a loud offline fallback with the
`wandb sync` command, credentials found as wandb finds them, and no exception out of any W&B call. Offline: the
"unreachable" server is a closed local port (directly or as the proxy)."""
import logging
import time
from unittest.mock import MagicMock

import pytest
import wandb
from omegaconf import OmegaConf

from loran.pipeline.tracking import finish_wandb, log_wandb, start_wandb

CLOSED = "http://127.0.0.1:9"  # nothing listens on the discard port: connection refused at once
FAKE_KEY = "f" * 40  # the right format, never valid
TIMEOUT = 3
# Without the timeout wandb waits 90 s for an unreachable server: a run that falls back well under that used ours. Not a
# timing of the machine: on 2 loaded cores start-up alone took 16 s (a bound of TIMEOUT + 10 failed there).
FALLBACK_BOUND = 45
RECORD = {"choices": {"adapter": "loran"}, "config": {"seed": 0}, "status": "ok", "metrics": {"rougeL": 0.5}}


def cfg(**logger):
    return OmegaConf.create({"cell": "c.seed0", "logger": {"report_to": ["wandb"], "project": "p", "group": "g",
                                                           "tags": ["t"], "init_timeout": TIMEOUT, **logger}})


@pytest.fixture
def no_wandb_login(tmp_path, monkeypatch):
    """No W&B credentials anywhere (HOME and wandb's folders under tmp_path); wandb's cached settings reset."""
    for var in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "WANDB_DIR", "NETRC",
                "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    for var, sub in [("HOME", "home"), ("WANDB_CONFIG_DIR", "wandb-config"), ("WANDB_CACHE_DIR", "wandb-cache"),
                     ("WANDB_DATA_DIR", "wandb-data")]:
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(var, str(tmp_path / sub))
    wandb.teardown()  # wandb reads the environment once per process
    yield tmp_path
    wandb.teardown()


def start_and_finish(tmp_path, caplog, **logger):
    """start_wandb then finish_wandb: (run, warnings logged, seconds taken)."""
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="loran.pipeline.tracking"):
        run = start_wandb(cfg(**logger), tmp_path / "out", RECORD)
        mode = run.settings.mode if run is not None else None
        sync_dir = run.settings.sync_dir if run is not None else None
        finish_wandb(run, RECORD)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    return mode, sync_dir, warnings, time.monotonic() - t0


@pytest.mark.parametrize("server", [CLOSED, "http://10.255.255.1"])  # refused / not routable
def test_unreachable_server_falls_back_offline_within_the_timeout(no_wandb_login, monkeypatch, caplog, server):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_BASE_URL", server)
    monkeypatch.setenv("WANDB_MODE", "online")
    mode, sync_dir, warnings, seconds = start_and_finish(no_wandb_login, caplog)
    assert mode == "offline"
    assert any("online failed" in w and f"wandb sync {sync_dir}" in w for w in warnings), warnings
    assert seconds < FALLBACK_BOUND


def test_online_without_a_key_falls_back_offline(no_wandb_login, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_MODE", "online")
    mode, sync_dir, warnings, seconds = start_and_finish(no_wandb_login, caplog)
    assert mode == "offline"
    assert any("no W&B API key" in w and f"wandb sync {sync_dir}" in w for w in warnings), warnings
    assert seconds < FALLBACK_BOUND


def test_a_key_in_netrc_counts_as_logged_in(no_wandb_login, monkeypatch, caplog):
    """`wandb login` leaves the key in ~/.netrc: tried online (the server is behind a closed proxy), then offline."""
    netrc = no_wandb_login / "home" / ".netrc"
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {FAKE_KEY}\n")
    netrc.chmod(0o600)
    for var in ("HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, CLOSED)
    mode, sync_dir, warnings, seconds = start_and_finish(no_wandb_login, caplog)
    assert mode == "offline"
    assert any("online failed" in w and f"wandb sync {sync_dir}" in w for w in warnings), warnings
    assert not any("no W&B API key" in w for w in warnings)
    assert seconds < FALLBACK_BOUND


def test_no_wandb_call_raises(no_wandb_login, monkeypatch, caplog):
    broken = MagicMock()
    broken.log.side_effect = ConnectionError("log")
    broken.summary.update.side_effect = RuntimeError("summary")
    broken.finish.side_effect = OSError("finish")
    with caplog.at_level(logging.WARNING, logger="loran.pipeline.tracking"):
        log_wandb(broken, {"loss": 1.0}, step=1)
        finish_wandb(broken, RECORD)
        finish_wandb(broken, {"status": "failed"})
        monkeypatch.setattr(wandb, "init", MagicMock(side_effect=RuntimeError("init")))
        assert start_wandb(cfg(), no_wandb_login / "out", RECORD) is None  # offline cannot start either
    assert broken.finish.call_count == 2  # a failed summary update does not skip finish
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) >= 6


@pytest.mark.parametrize("off", [{"report_to": ["none"]}, "disabled"])
def test_off_means_no_run(no_wandb_login, monkeypatch, off):
    if off == "disabled":
        monkeypatch.setenv("WANDB_MODE", "disabled")
    assert start_wandb(cfg(**(off if isinstance(off, dict) else {})), no_wandb_login / "out", RECORD) is None
