"""Hub round trips over real HTTP against tests/hub_server.py (127.0.0.1 only), and hub.py helpers.

HF_ENDPOINT / HF_HOME are read when huggingface_hub is imported, so every Hub client runs in a
subprocess whose environment points at the local server. Each client subprocess also installs a
socket guard that refuses (and records) any connection or name lookup beyond loopback.
"""

import base64
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hub_server import HubServer, git_blob_oid  # noqa: E402

from ddpm_from_scratch.hub import (  # noqa: E402
    REQUIRED_TAGS,
    model_card_text,
    public_training_args,
    push_folder,
)

FAKE_TOKEN = "hf_" + "TestTokenNotASecret0123456789abcd"
HAS_PIPELINE = importlib.util.find_spec("ddpm_from_scratch.pipeline_ddpm") is not None
needs_pipeline = pytest.mark.skipif(not HAS_PIPELINE, reason="ddpm_from_scratch.pipeline_ddpm not written yet")

# Installed first in every client subprocess: only loopback connections and lookups are allowed.
NET_GUARD = r'''
import atexit, ipaddress, json, os, socket
_violations = []
def _loopback(host):
    host = host.decode() if isinstance(host, bytes) else str(host)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False
def _check(sock, address):
    if sock.family in (socket.AF_INET, socket.AF_INET6) and not _loopback(address[0]):
        _violations.append(f"connect {address[0]}:{address[1]}")
        raise OSError(f"test guard: connection to {address[0]} refused")
_connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo
socket.socket.connect = lambda self, a: (_check(self, a), _connect(self, a))[1]
socket.socket.connect_ex = lambda self, a: (_check(self, a), _connect_ex(self, a))[1]
def _guarded_getaddrinfo(host, *args, **kwargs):
    if host is not None and not _loopback(host):
        _violations.append(f"resolve {host}")
        raise socket.gaierror(f"test guard: lookup of {host} refused")
    return _getaddrinfo(host, *args, **kwargs)
socket.getaddrinfo = _guarded_getaddrinfo
atexit.register(lambda: open(os.environ["NET_GUARD_LOG"], "w").write(json.dumps(_violations)))
'''

PUSH_SCRIPT = r'''
import json, os, sys
import numpy as np, torch
from safetensors.torch import save_file
from ddpm_from_scratch import ScratchDDPMScheduler
from ddpm_from_scratch.unet_presets import build_unet

out, parts = sys.argv[1], sys.argv[2].split(",")
result = {}
torch.manual_seed(0)
unet = build_unet("tiny")
scheduler = ScratchDDPMScheduler(num_train_timesteps=100, beta_schedule="linear")

if "plain" in parts:
    # the UNet's and the scheduler's own push_to_hub; the UNet is pushed twice (two commits)
    result["unet_v1"] = unet.push_to_hub("user/unet").oid
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, f"{out}/unet_v1.safetensors")
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.5)
    result["unet_v2"] = unet.push_to_hub("user/unet").oid
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, f"{out}/unet_v2.safetensors")
    result["sched"] = scheduler.push_to_hub("user/sched").oid
    json.dump(dict(scheduler.config), open(f"{out}/sched_config.json", "w"))

if "pipeline" in parts:
    from ddpm_from_scratch.hub import push_folder, write_model_card
    from ddpm_from_scratch.pipeline_ddpm import ScratchDDPMPipeline
    pipe = ScratchDDPMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    result["pipe"] = pipe.push_to_hub("user/pipe").oid
    save_file({k: v.contiguous() for k, v in pipe.unet.state_dict().items()}, f"{out}/pipe_unet.safetensors")
    json.dump({"unet": dict(pipe.unet.config), "scheduler": dict(pipe.scheduler.config)},
              open(f"{out}/pipe_config.json", "w"), default=list)
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(1234), num_inference_steps=4,
                  output_type="np").images
    np.save(f"{out}/pipe_samples.npy", np.asarray(images))

    # a training output folder: pipeline + card + sample grid + things that must not be pushed
    folder = f"{out}/trained"
    pipe.save_pretrained(folder)
    os.makedirs(f"{folder}/samples", exist_ok=True)
    pipe(batch_size=1, generator=torch.Generator().manual_seed(0), num_inference_steps=2).images[0].save(
        f"{folder}/samples/final.png")
    for ckpt in ("checkpoint-10", "checkpoint-20"):
        os.makedirs(f"{folder}/{ckpt}/nested", exist_ok=True)
        open(f"{folder}/{ckpt}/optimizer.bin", "wb").write(b"\0" * 64)
        open(f"{folder}/{ckpt}/nested/ema.safetensors", "wb").write(b"\1" * 64)
    os.makedirs(f"{folder}/logs/run1", exist_ok=True)
    open(f"{folder}/logs/run1/events.out.tfevents.1", "wb").write(b"log")
    open(f"{folder}/model_index.json.tmp", "w").write("{}")
    args = {"learning_rate": 1e-4, "train_batch_size": 16, "hub_token": os.environ["HF_TOKEN"],
            "hub_model_id": "user/trained", "output_dir": folder, "API_KEY": "k" * 12,
            "wandb_password": "p" * 12, "adam_betas": (0.9, 0.999)}
    write_model_card(folder, "user/trained", dataset_name="sklearn digits (built-in)", training_args=args,
                     metrics={"loss": 0.0421, "bits_per_dim": 3.9, "fdd": 1.5},
                     sample_grid="samples/final.png", num_inference_steps=3)
    info = push_folder(folder, "user/trained")
    result["trained"] = info.oid
    result["trained_url"] = str(info)

json.dump(result, open(f"{out}/push.json", "w"))
'''

PULL_SCRIPT = r'''
import json, os, sys
import numpy as np, torch
from safetensors.torch import save_file
from diffusers import UNet2DModel
from ddpm_from_scratch import ScratchDDPMScheduler

out, parts, push = sys.argv[1], sys.argv[2].split(","), json.load(open(sys.argv[3]))
result = {}
if "plain" in parts:
    for name, revision in (("main", None), ("v1", push["unet_v1"])):
        unet = UNet2DModel.from_pretrained("user/unet", revision=revision)
        save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, f"{out}/pulled_unet_{name}.safetensors")
    scheduler = ScratchDDPMScheduler.from_pretrained("user/sched")
    result["sched_class"] = type(scheduler).__name__
    json.dump(dict(scheduler.config), open(f"{out}/pulled_sched_config.json", "w"))

if "pipeline" in parts:
    # diffusers' own entry point, with nothing imported but the package root, and its own clean cache
    import diffusers
    import ddpm_from_scratch
    try:
        generic = diffusers.DiffusionPipeline.from_pretrained("user/pipe", cache_dir=f"{out}/generic_cache")
        result["generic_class"] = type(generic).__module__ + "." + type(generic).__name__
    except Exception as e:
        result["generic_class"] = f"{type(e).__name__}: {e}"

    from ddpm_from_scratch.pipeline_ddpm import ScratchDDPMPipeline
    pipe = ScratchDDPMPipeline.from_pretrained("user/pipe")
    pipe.set_progress_bar_config(disable=True)
    save_file({k: v.contiguous() for k, v in pipe.unet.state_dict().items()}, f"{out}/pulled_pipe_unet.safetensors")
    json.dump({"unet": dict(pipe.unet.config), "scheduler": dict(pipe.scheduler.config)},
              open(f"{out}/pulled_pipe_config.json", "w"), default=list)
    result["pipe_scheduler_class"] = type(pipe.scheduler).__name__
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(1234), num_inference_steps=4,
                  output_type="np").images
    np.save(f"{out}/pulled_pipe_samples.npy", np.asarray(images))
    # the model card's usage snippet, run as written
    os.chdir(out)
    namespace = {}
    try:
        exec(compile(open(f"{out}/snippet.py").read(), "model-card-snippet", "exec"), namespace)
        result["snippet_pipe_class"] = type(namespace["pipe"]).__name__
        result["snippet_images"] = len(namespace["images"])
        result["snippet_png"] = os.path.isfile(f"{out}/sample.png")
    except Exception as e:  # reported by the card test, the other tests still run
        result["snippet_error"] = f"{type(e).__name__}: {e}"
    from huggingface_hub import HfApi
    info = HfApi().model_info("user/trained")
    result["card_library_name"], result["card_tags"] = info.library_name, info.tags

json.dump(result, open(f"{out}/pull.json", "w"))
'''


def _run_client(hub, script, args, workdir, hf_home, tag):
    """Run a client script in a subprocess talking only to ``hub``; return its guard violations."""
    path = os.path.join(workdir, f"{tag}.py")
    with open(path, "w") as f:
        f.write(NET_GUARD + script)
    env = hub.client_env(hf_home, token=FAKE_TOKEN)
    env.update(NET_GUARD_LOG=os.path.join(workdir, f"{tag}_guard.json"), OMP_NUM_THREADS="1",
               DIFFUSERS_NO_ADVISORY_WARNINGS="1", TQDM_DISABLE="1")
    proc = subprocess.run([sys.executable, path, *args], env=env, cwd=workdir, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"{tag} client failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    with open(env["NET_GUARD_LOG"]) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    """Push (one subprocess, one HF_HOME), then pull with a clean cache (another subprocess)."""
    parts = "plain,pipeline" if HAS_PIPELINE else "plain"
    work = str(tmp_path_factory.mktemp("hub_round_trip"))
    with HubServer(root=os.path.join(work, "server")) as hub:
        violations = _run_client(hub, PUSH_SCRIPT, [work, parts], work, os.path.join(work, "home_push"), "push")
        if HAS_PIPELINE:
            readme = hub.read_files("user/trained")["README.md"].decode()
            snippet = readme.split("```python\n", 1)[1].split("```", 1)[0]
            with open(os.path.join(work, "snippet.py"), "w") as f:
                f.write(snippet)
        violations += _run_client(hub, PULL_SCRIPT, [work, parts, os.path.join(work, "push.json")], work,
                                  os.path.join(work, "home_pull"), "pull")
        with open(os.path.join(work, "push.json")) as f:
            pushed = json.load(f)
        with open(os.path.join(work, "pull.json")) as f:
            pulled = json.load(f)
        yield {"hub": hub, "work": work, "pushed": pushed, "pulled": pulled, "violations": violations,
               "requests": hub.requests}


def _assert_same_weights(a_path, b_path):
    a, b = load_file(a_path), load_file(b_path)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def _public(config):
    return {k: v for k, v in config.items() if not k.startswith("_")}


# -- round trips ------------------------------------------------------------------------------
def test_unet_and_scheduler_push_to_hub_round_trip_with_history(round_trip):
    work, hub, pushed = round_trip["work"], round_trip["hub"], round_trip["pushed"]
    _assert_same_weights(f"{work}/unet_v2.safetensors", f"{work}/pulled_unet_main.safetensors")
    _assert_same_weights(f"{work}/unet_v1.safetensors", f"{work}/pulled_unet_v1.safetensors")
    v1, v2 = load_file(f"{work}/unet_v1.safetensors"), load_file(f"{work}/unet_v2.safetensors")
    assert not all(torch.equal(v1[k], v2[k]) for k in v1)  # the two revisions really differ
    history = [c["id"] for c in hub.commits("user/unet")]
    assert history[:2] == [pushed["unet_v2"], pushed["unet_v1"]] and len(history) == 3  # + initial
    files = hub.read_files("user/unet")
    assert "diffusion_pytorch_model.safetensors" in files
    assert not any(p.endswith((".bin", ".pt", ".pth", ".ckpt")) for p in files)  # safetensors only
    with open(f"{work}/sched_config.json") as f, open(f"{work}/pulled_sched_config.json") as g:
        assert _public(json.load(f)) == _public(json.load(g))
    assert round_trip["pulled"]["sched_class"] == "ScratchDDPMScheduler"
    stored = json.loads(hub.read_files("user/sched")["scheduler_config.json"])
    assert stored["_class_name"] == "ScratchDDPMScheduler"


@needs_pipeline
def test_pipeline_push_to_hub_then_from_pretrained_is_bit_identical(round_trip):
    work, pulled = round_trip["work"], round_trip["pulled"]
    _assert_same_weights(f"{work}/pipe_unet.safetensors", f"{work}/pulled_pipe_unet.safetensors")
    with open(f"{work}/pipe_config.json") as f, open(f"{work}/pulled_pipe_config.json") as g:
        before, after = json.load(f), json.load(g)
    assert _public(before["unet"]) == _public(after["unet"])
    assert _public(before["scheduler"]) == _public(after["scheduler"])
    assert pulled["pipe_scheduler_class"] == "ScratchDDPMScheduler"
    a, b = np.load(f"{work}/pipe_samples.npy"), np.load(f"{work}/pulled_pipe_samples.npy")
    assert a.shape == b.shape and a.shape[0] == 2 and np.array_equal(a, b)
    index = json.loads(round_trip["hub"].read_files("user/pipe")["model_index.json"])
    assert index["_class_name"] == "ScratchDDPMPipeline"
    assert index["scheduler"][0].split(".")[0] == "ddpm_from_scratch"
    assert index["scheduler"][1] == "ScratchDDPMScheduler" and index["unet"] == ["diffusers", "UNet2DModel"]


@needs_pipeline
def test_diffusion_pipeline_from_pretrained_gives_scratch_pipeline(round_trip):
    assert round_trip["pulled"]["generic_class"] == "ddpm_from_scratch.pipeline_ddpm.ScratchDDPMPipeline"


@needs_pipeline
def test_push_folder_skips_checkpoints_logs_and_temporaries(round_trip):
    hub = round_trip["hub"]
    files = set(hub.read_files("user/trained"))
    assert {"README.md", "model_index.json", "samples/final.png", "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"} <= files
    leaked = [p for p in files if p.startswith(("checkpoint-", "logs/")) or p.endswith(".tmp")]
    assert leaked == []
    head = hub.commits("user/trained")[0]
    assert head["id"] == round_trip["pushed"]["trained"]
    assert round_trip["pushed"]["trained_url"].endswith(f"/user/trained/commit/{head['id']}")


@needs_pipeline
def test_model_card_metadata_snippet_and_no_secrets(round_trip):
    hub, pulled = round_trip["hub"], round_trip["pulled"]
    readme = hub.read_files("user/trained")["README.md"].decode()
    front = readme.split("---\n")[1]
    assert "library_name: diffusers" in front.splitlines()
    for tag in REQUIRED_TAGS:
        assert f"- {tag}" in front.splitlines()
    assert "![samples](samples/final.png)" in readme and "datasets:" not in front
    assert "| learning_rate | 0.0001 |" in readme and "| hub_model_id | user/trained |" in readme
    for secret_key in ("hub_token", "API_KEY", "wandb_password"):
        assert f"| {secret_key} |" not in readme
    # the Hub's own reading of the card (model_info parses the front matter)
    assert pulled["card_library_name"] == "diffusers" and set(REQUIRED_TAGS) <= set(pulled["card_tags"])
    assert "snippet_error" not in pulled, pulled.get("snippet_error")
    assert pulled["snippet_pipe_class"] == "ScratchDDPMPipeline"
    assert pulled["snippet_images"] == 4 and pulled["snippet_png"]
    # no secret value appears in any uploaded file of any repository (plain or base64)
    for repo_type, repo_id in hub.store.repos:
        for path, data in hub.read_files(repo_id, repo_type=repo_type).items():
            for needle in (FAKE_TOKEN.encode(), base64.b64encode(FAKE_TOKEN.encode()), b"k" * 12, b"p" * 12):
                assert needle not in data, f"{repo_id}/{path} leaks a secret"


def test_all_traffic_stayed_on_loopback(round_trip):
    hub, requests = round_trip["hub"], round_trip["requests"]
    assert round_trip["violations"] == []
    assert len(requests) > 10
    assert {r.client for r in requests} == {"127.0.0.1"}
    assert {r.host for r in requests} == {f"127.0.0.1:{hub.port}"}
    assert [r for r in requests if not r.handled] == []
    assert all(r.status < 500 for r in requests)
    seen = {(r.method, r.path) for r in requests}
    assert ("POST", "/api/repos/create") in seen
    assert ("POST", "/api/models/user/unet/preupload/main") in seen
    assert ("POST", "/api/models/user/unet/commit/main") in seen
    assert any(m == "GET" and "/resolve/" in p and p.endswith(".safetensors") for m, p in seen)
    assert not any("xet" in r.path.lower() or "lfs" in r.path.lower() for r in requests)
    writes = [r for r in requests if r.method in ("POST", "DELETE") and "validate-yaml" not in r.path]
    assert all(r.authorized for r in writes)


# -- the server on its own (stdlib clients: fast) ---------------------------------------------------
def _http(method, url, body=None, headers=None):
    data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
    request = urllib.request.Request(url, data=data, method=method, headers={
        "Authorization": f"Bearer {FAKE_TOKEN}", "Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _ndjson(*items):
    return b"".join(json.dumps(item).encode() + b"\n" for item in items)


def test_server_errors_headers_and_history(tmp_path):
    with HubServer(root=str(tmp_path)) as hub:
        base = hub.url
        assert _http("POST", f"{base}/api/repos/create", {"name": "r", "organization": "org"})[0] == 200
        status, _, body = _http("POST", f"{base}/api/repos/create", {"name": "r", "organization": "org"})
        assert status == 409 and json.loads(body)["url"] == f"{base}/org/r"
        data = b"weights \x00\x01" * 10
        commit = _ndjson({"key": "header", "value": {"summary": "add"}},
                         {"key": "file", "value": {"path": "a/b.bin", "encoding": "base64",
                                                   "content": base64.b64encode(data).decode()}})
        status, _, body = _http("POST", f"{base}/api/models/org/r/commit/main", commit,
                                {"Content-Type": "application/x-ndjson"})
        sha = json.loads(body)["commitOid"]
        status, headers, body = _http("GET", f"{base}/org/r/resolve/main/a/b.bin")
        assert (status, body, headers["X-Repo-Commit"]) == (200, data, sha)
        assert headers["ETag"] == f'"{git_blob_oid(data)}"' and int(headers["Content-Length"]) == len(data)
        assert not any(k.lower().startswith("x-xet") for k in headers) and "Link" not in headers
        status, headers, body = _http("GET", f"{base}/org/r/resolve/main/a/b.bin", headers={"Range": "bytes=5-"})
        assert status == 206 and body == data[5:]
        cases = [(f"{base}/org/r/resolve/main/missing.txt", "EntryNotFound"),
                 (f"{base}/org/nope/resolve/main/a/b.bin", "RepoNotFound"),
                 (f"{base}/org/r/resolve/nobranch/a/b.bin", "RevisionNotFound"),
                 (f"{base}/api/models/org/r/tree/main/zz", "EntryNotFound")]
        for url, code in cases:
            status, headers, _ = _http("GET", url)
            assert (status, headers.get("X-Error-Code")) == (404, code), url
        assert _http("HEAD", f"{base}/org/r/resolve/main/missing.txt")[1]["X-Repo-Commit"] == sha
        lfs = _ndjson({"key": "header", "value": {"summary": "lfs"}},
                      {"key": "lfsFile", "value": {"path": "x", "algo": "sha256", "oid": "0" * 64}})
        assert _http("POST", f"{base}/api/models/org/r/commit/main", lfs)[0] == 400
        status, _, body = _http("POST", f"{base}/api/models/org/r/preupload/main",
                                {"files": [{"path": "a/b.bin", "sample": "", "size": 3}]})
        assert json.loads(body)["files"] == [{"path": "a/b.bin", "uploadMode": "regular",
                                              "shouldIgnore": False, "oid": git_blob_oid(data)}]
        delete = _ndjson({"key": "header", "value": {"summary": "rm"}},
                         {"key": "deletedFile", "value": {"path": "a/b.bin"}})
        assert _http("POST", f"{base}/api/models/org/r/commit/main", delete)[0] == 200
        assert _http("GET", f"{base}/org/r/resolve/main/a/b.bin")[0] == 404
        assert _http("GET", f"{base}/org/r/resolve/{sha}/a/b.bin")[2] == data  # history kept
        assert _http("POST", f"{base}/api/repos/create", {"name": "s"}, {"Authorization": ""})[0] == 401
        assert [c["title"] for c in hub.commits("org/r")] == ["rm", "add", "initial commit"]


def test_server_command_line_persists_repositories(tmp_path):
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hub_server.py")
    root = str(tmp_path / "root")
    for attempt in range(2):
        proc = subprocess.Popen([sys.executable, script, "--port", "0", "--root", root],
                                stdout=subprocess.PIPE, text=True)
        try:
            line = proc.stdout.readline().strip()
            assert line.startswith("HUB_SERVER_URL=http://127.0.0.1:")
            url = line.split("=", 1)[1]
            if attempt == 0:
                assert _http("POST", f"{url}/api/repos/create", {"name": "kept"})[0] == 200
            status, _, body = _http("GET", f"{url}/api/models/user/kept")
            assert status == 200 and [s["rfilename"] for s in json.loads(body)["siblings"]] == [".gitattributes"]
            log = json.loads(_http("GET", f"{url}/_hub_server/requests")[2])
            assert log[-1]["path"] == "/api/models/user/kept" and log[-1]["client"] == "127.0.0.1"
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def test_server_refuses_non_loopback_host():
    with pytest.raises(ValueError, match="host"):
        HubServer(host="0.0.0.0")


# -- hub.py helpers without network ---------------------------------------------------------------
def test_public_training_args_drops_every_secret_key():
    import dataclasses

    @dataclasses.dataclass
    class Settings:
        hub_token: str = "x"
        token: str = "y"
        db_password: str = "z"
        client_secret: str = "s"
        openai_api_key: str = "k"
        learning_rate: float = 2e-4
        hub_model_id: str = "u/m"

    assert public_training_args(Settings()) == {"learning_rate": 2e-4, "hub_model_id": "u/m"}
    assert public_training_args(dataclasses.asdict(Settings())) == {"learning_rate": 2e-4, "hub_model_id": "u/m"}
    from ddpm_from_scratch.trainer import TrainConfig

    public = public_training_args(TrainConfig(hub_token="hf_secret", learning_rate=1e-3))
    assert "hub_token" not in public and public["learning_rate"] == 1e-3
    with pytest.raises(TypeError, match="training_args"):
        public_training_args(Settings)  # the class, not an instance
    with pytest.raises(TypeError, match="training_args"):
        public_training_args(["not", "a", "mapping"])


def test_model_card_redacts_token_values_and_validates(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    text = model_card_text("user/m", training_args={"note": f"pushed with {FAKE_TOKEN}",
                                                    "other": "hf_" + "Z" * 30})
    assert FAKE_TOKEN not in text and "hf_" + "Z" * 30 not in text and "<redacted>" in text
    assert 'ScratchDDPMPipeline.from_pretrained("user/m")' in text
    assert "datasets:\n- huggan/flowers\n" in model_card_text("user/m", dataset_name="huggan/flowers")
    local = model_card_text("user/m", dataset_name="sklearn digits (built-in)")
    assert "datasets:" not in local and "`sklearn digits (built-in)`" in local
    with pytest.raises(ValueError, match="repo_id"):
        model_card_text("")
    with pytest.raises(ValueError, match="num_inference_steps"):
        model_card_text("user/m", num_inference_steps=0)
    with pytest.raises(ValueError, match="sample_grid"):
        model_card_text("user/m", sample_grid="/abs/grid.png")


def test_push_folder_refuses_bad_input_before_any_request(tmp_path):
    with pytest.raises(ValueError, match="output_dir"):
        push_folder(tmp_path / "missing", "user/m")
    with pytest.raises(ValueError, match="repo_id"):
        push_folder(tmp_path, "not a repo id")
    (tmp_path / "checkpoint-1").mkdir()
    (tmp_path / "checkpoint-1" / "w.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="no file to push"):
        push_folder(tmp_path, "user/m")
    (tmp_path / "notes.txt").write_text(f"token={FAKE_TOKEN}")
    with pytest.raises(ValueError, match="notes.txt"):
        push_folder(tmp_path, "user/m", token=FAKE_TOKEN)


def test_client_network_guard_refuses_and_records_non_loopback(tmp_path):
    probe = NET_GUARD + textwrap.dedent('''
        import socket
        for attempt in (lambda: socket.socket().connect(("10.255.255.1", 80)),
                        lambda: socket.create_connection(("10.255.255.2", 80), timeout=1),
                        lambda: socket.getaddrinfo("huggingface.co", 443)):
            try:
                attempt()
                raise SystemExit("guard let a non-loopback attempt through")
            except OSError:
                pass
        socket.getaddrinfo("127.0.0.1", 80)
    ''')
    log = tmp_path / "guard.json"
    proc = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "NET_GUARD_LOG": str(log)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(log.read_text()) == ["connect 10.255.255.1:80", "resolve 10.255.255.2",
                                           "resolve huggingface.co"]
