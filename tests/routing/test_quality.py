"""Quality loss: reference values, switch-off of every term, missing extras/weights, LPIPS on its real network
with a random backbone, BIQA/HPS-style one-sided penalties, and Gemini through google-genai against a local
HTTP server."""

from __future__ import annotations

import base64
import json
import logging
import sys
import threading
import types
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch

from flux2ttr.routing import quality as Q
from flux2ttr.routing.quality import (
    QualityConfig,
    QualityDependencyError,
    QualityLoss,
    QualityWeightsError,
    gemini_penalty,
    parse_gemini_scores,
)

MODEL = "gemini-3-flash-preview"


def _imgs(b=2, h=32, w=48, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_rmse_cosine_reference_values_on_latents_and_images():
    g = torch.Generator().manual_seed(1)
    s_lat, t_lat = torch.randn(2, 12, 8, generator=g), torch.randn(1, 12, 8, generator=g)
    s_img, t_img = _imgs(2), _imgs(1, seed=5)
    ql = QualityLoss(QualityConfig(rmse_weight=2.0, cosine_weight=3.0))
    total, terms = ql(s_img, t_img, student_latents=s_lat, teacher_latents=t_lat)
    s, t = s_lat.reshape(2, -1).double(), t_lat.reshape(1, -1).double().expand(2, -1)
    rmse = ((s - t) ** 2).mean(1).sqrt().mean()
    cos = (1 - (s * t).sum(1) / (s.norm(dim=1) * t.norm(dim=1))).mean()
    assert set(terms) == {"rmse", "cosine"}
    assert terms["rmse"] == pytest.approx(float(rmse), rel=1e-9)
    assert terms["cosine"] == pytest.approx(float(cos), rel=1e-9)
    assert float(total) == pytest.approx(2 * float(rmse) + 3 * float(cos), rel=1e-9)
    # latent_space off (or no latents): the same terms on images
    _, t_im = QualityLoss(QualityConfig(latent_space=False))(s_img, t_img, student_latents=s_lat,
                                                             teacher_latents=t_lat)
    si, ti = s_img.reshape(2, -1).double(), t_img.reshape(1, -1).double().expand(2, -1)
    assert t_im["rmse"] == pytest.approx(float(((si - ti) ** 2).mean(1).sqrt().mean()), rel=1e-6)
    assert QualityLoss(QualityConfig())(s_img, t_img)[1] == t_im
    # identical outputs: zero loss
    assert float(ql(s_img, s_img, student_latents=s_lat, teacher_latents=s_lat)[0]) == pytest.approx(0, abs=1e-7)


def test_every_term_is_off_at_weight_zero(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a model with weight 0 was loaded")

    for name in ("_load_lpips", "_load_dreamsim", "_load_hps", "_load_pyiqa", "_gemini_client"):
        monkeypatch.setattr(Q, name, boom)
    ql = QualityLoss(QualityConfig())  # every optional weight defaults to 0
    total, terms = ql(_imgs(), _imgs(1, seed=2))
    assert set(terms) == {"rmse", "cosine"} and float(total) > 0
    # and each one *is* loaded when its weight is > 0
    for field in ("lpips_weight", "dreamsim_weight", "hps_weight", "biqa_quality_weight", "biqa_aesthetic_weight",
                  "gemini_similarity_weight", "gemini_quality_weight"):
        with pytest.raises(AssertionError, match="was loaded"):
            QualityLoss(QualityConfig(**{field: 1.0}))


@pytest.mark.parametrize("field,module,extra", [
    ("lpips_weight", "lpips", "lpips"),
    ("dreamsim_weight", "dreamsim", "dreamsim"),
    ("hps_weight", "hpsv2", "hps"),
    ("biqa_quality_weight", "pyiqa", "pyiqa"),
    ("biqa_aesthetic_weight", "pyiqa", "pyiqa"),
    ("gemini_similarity_weight", "google.genai", "gemini"),
    ("gemini_quality_weight", "google.genai", "gemini"),
])
def test_missing_package_names_the_extra(monkeypatch, field, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # import of it fails as when not installed
    with pytest.raises(QualityDependencyError, match=rf'pip install "flux2ttr\[{extra}\]"'):
        QualityLoss(QualityConfig(**{field: 1.0}, gemini_api_key="k"))


def test_missing_weights_files_are_named(monkeypatch, tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(QualityWeightsError, match=rf"{missing}.*quality.lpips_backbone"):
        QualityLoss(QualityConfig(lpips_weight=1.0, lpips_backbone=str(missing)))
    with pytest.raises(QualityWeightsError, match=rf"{missing}.*quality.lpips_linear"):
        QualityLoss(QualityConfig(lpips_weight=1.0, lpips_linear=str(missing)))
    # packages present (bare modules: only the weights check is reached), files absent
    for mod in ("dreamsim", "pyiqa"):
        monkeypatch.setitem(sys.modules, mod, types.ModuleType(mod))
    with pytest.raises(QualityWeightsError, match="quality.dreamsim_cache_dir is empty"):
        QualityLoss(QualityConfig(dreamsim_weight=1.0))
    with pytest.raises(QualityWeightsError, match=rf"{missing}.*quality.biqa_quality_weights"):
        QualityLoss(QualityConfig(biqa_quality_weight=1.0, biqa_quality_weights=str(missing)))
    with pytest.raises(QualityWeightsError, match="quality.biqa_aesthetic_weights is empty"):
        QualityLoss(QualityConfig(biqa_aesthetic_weight=1.0))


# ------------------------------------------------------------------------------------------ LPIPS
@pytest.fixture(scope="module")
def lpips_loss():
    return QualityLoss(QualityConfig(rmse_weight=0.0, cosine_weight=0.0, lpips_weight=1.0))


def test_lpips_real_network_random_backbone(lpips_loss):
    import lpips

    assert isinstance(lpips_loss.lpips, lpips.LPIPS)
    a = _imgs(1, 32, 32, seed=3)
    noise = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    near, far = (a + 0.03 * noise).clamp(0, 1), (a + 0.3 * noise).clamp(0, 1)
    same = lpips_loss(a, a)[1]["lpips"]
    d_near, d_far = lpips_loss(near, a)[1]["lpips"], lpips_loss(far, a)[1]["lpips"]
    assert same == pytest.approx(0.0, abs=1e-9)
    assert 0 < d_near < d_far
    total, terms = lpips_loss(far, a)
    assert float(total) == pytest.approx(terms["lpips"])  # only LPIPS weighted
    # bundled linear weights are loaded, not left at init
    lin = lpips_loss.lpips.lin0.model[-1].weight
    assert (lin >= 0).all() and lin.abs().sum() > 0
    # same seed -> same random backbone -> same value
    again = QualityLoss(QualityConfig(rmse_weight=0.0, cosine_weight=0.0, lpips_weight=1.0))
    assert again(far, a)[1]["lpips"] == pytest.approx(d_far, rel=1e-6)


def test_lpips_user_backbone_file(tmp_path):
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(7)
    feats = torchvision.models.alexnet(weights=None).state_dict()
    path = tmp_path / "alexnet.safetensors"
    save_file({k: v.contiguous() for k, v in feats.items()}, str(path))
    ql = QualityLoss(QualityConfig(lpips_weight=1.0, lpips_backbone=str(path)))
    assert torch.equal(ql.lpips.net.slice1[0].weight, feats["features.0.weight"])
    assert torch.equal(getattr(ql.lpips.net.slice5, "10").bias, feats["features.10.bias"])
    save_file({"other.weight": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(QualityWeightsError, match="no tensor 'features.0.weight'"):
        QualityLoss(QualityConfig(lpips_weight=1.0, lpips_backbone=str(tmp_path / "bad.safetensors")))


# ------------------------------------------------------------------------------------------ BIQA / HPS penalty
class _Brightness(torch.nn.Module):
    """A no-reference score: mean pixel value (higher = better unless lower_better)."""

    def __init__(self, lower_better=False):
        super().__init__()
        self.lower_better = lower_better

    def forward(self, x):
        return x.mean(dim=(1, 2, 3))


def test_biqa_penalises_only_teacher_better(monkeypatch):
    monkeypatch.setattr(Q, "_load_pyiqa", lambda cfg, metric, weights, term: _Brightness(term == "biqa_aesthetic"))
    ql = QualityLoss(QualityConfig(rmse_weight=0, cosine_weight=0, biqa_quality_weight=2.0, biqa_aesthetic_weight=1.0))
    t = torch.full((1, 3, 8, 8), 0.5)
    s = torch.stack([torch.full((3, 8, 8), 0.3), torch.full((3, 8, 8), 0.8)])
    total, terms = ql(s, t)
    # higher-better: relu(0.5 - [0.3, 0.8]) = [0.2, 0]; lower-better flips: relu([0.3, 0.8] - 0.5) = [0, 0.3]
    assert terms["biqa_quality"] == pytest.approx(0.1)
    assert terms["biqa_aesthetic"] == pytest.approx(0.15)
    assert float(total) == pytest.approx(2 * 0.1 + 0.15)


# ------------------------------------------------------------------------------------------ Gemini
def test_parse_and_penalty():
    assert parse_gemini_scores('{"similarity": 7, "quality": 10}') == (7.0, 10.0)
    assert parse_gemini_scores('```json\n{"similarity": 1.5, "quality": 4}\n```') == (1.5, 4.0)
    for bad in ("not json", '{"similarity": 7}', '{"similarity": 0, "quality": 5}', '{"similarity": 7, "quality": 11}',
                '{"similarity": "7", "quality": 5}', '{"similarity": true, "quality": 5}'):
        with pytest.raises(ValueError):
            parse_gemini_scores(bad)
    assert gemini_penalty(10) == 0.0 and gemini_penalty(1) == 1.0
    assert gemini_penalty(7) == pytest.approx(3 / 9)
    assert gemini_penalty(12) == 0.0 and gemini_penalty(-3) == 1.0  # clamped to [0, 1]


class _Server:
    """A local generateContent endpoint; ``reply`` is ``(status, model text)`` per request."""

    def __init__(self):
        self.requests: list[tuple[str, dict, dict]] = []
        self.reply = (200, '{"similarity": 7, "quality": 4}')
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((self.path, dict(self.headers), body))
                status, text = outer.reply
                payload = ({"candidates": [{"content": {"role": "model", "parts": [{"text": text}]},
                                            "finishReason": "STOP"}]} if status == 200
                           else {"error": {"code": status, "message": "boom", "status": "INTERNAL"}})
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass

        self.httpd = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def server():
    s = _Server()
    yield s
    s.close()


def _gemini_loss(server, monkeypatch, **kw):
    monkeypatch.setenv("TEST_GEMINI_KEY", "secret-key")
    cfg = QualityConfig(gemini_similarity_weight=0.5, gemini_quality_weight=0.25, gemini_base_url=server.url,
                        gemini_api_key_env="TEST_GEMINI_KEY", gemini_timeout_s=10.0, **kw)
    return QualityLoss(cfg)


def test_gemini_request_and_penalties(server, monkeypatch):
    ql = _gemini_loss(server, monkeypatch)
    s, t = _imgs(2, 16, 16), _imgs(1, 16, 16, seed=9)
    total, terms = ql(s, t)
    assert len(server.requests) == 2  # one rating per batch row
    path, headers, body = server.requests[0]
    assert path.startswith("/v1") and path.endswith(f"/models/{MODEL}:generateContent")
    assert headers.get("x-goog-api-key") == "secret-key"
    parts = [p for c in body["contents"] for p in c["parts"]]
    inline = [p["inlineData"] for p in parts if "inlineData" in p]
    assert len(inline) == 2 and all(d.get("mimeType", d.get("mime_type")) == "image/png" for d in inline)
    pngs = [base64.b64decode(d["data"], altchars=b"-_") for d in inline]
    assert all(p.startswith(b"\x89PNG\r\n\x1a\n") for p in pngs)
    assert pngs[0] == Q.png_bytes(t[0]) and pngs[1] == Q.png_bytes(s[0])  # teacher first, then student
    assert terms["gemini_similarity"] == pytest.approx(3 / 9) and terms["gemini_quality"] == pytest.approx(6 / 9)
    assert float(total) == pytest.approx(terms["rmse"] + terms["cosine"] + 0.5 * 3 / 9 + 0.25 * 6 / 9)
    assert ql.skipped == []


@pytest.mark.parametrize("reply", [(500, ""), (200, "this is not json"), (200, '{"similarity": 0, "quality": 4}'),
                                   (200, '{"similarity": 7, "quality": 42}')])
def test_gemini_failure_skips_terms(server, monkeypatch, caplog, reply):
    ql = _gemini_loss(server, monkeypatch)
    server.reply = reply
    s, t = _imgs(1, 16, 16), _imgs(1, 16, 16, seed=9)
    with caplog.at_level(logging.WARNING, logger="flux2ttr.routing.quality"):
        total, terms = ql(s, t)
    assert len(server.requests) == 1  # no silent retries
    assert set(terms) == {"rmse", "cosine"}
    assert ql.skipped == ["gemini_similarity", "gemini_quality"]
    assert float(total) == pytest.approx(terms["rmse"] + terms["cosine"])
    assert "skipping the Gemini terms" in caplog.text
    server.reply = (200, '{"similarity": 10, "quality": 10}')  # the next call works again
    _, terms = ql(s, t)
    assert terms["gemini_similarity"] == 0.0 and ql.skipped == []


def test_gemini_needs_a_key(monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    from flux2ttr.config import ConfigError

    with pytest.raises(ConfigError, match="NO_SUCH_KEY_VAR"):
        QualityLoss(QualityConfig(gemini_quality_weight=1.0, gemini_api_key_env="NO_SUCH_KEY_VAR"))
