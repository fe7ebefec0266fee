"""Export downloads: the registry (private folder, owner, expiry), the admin's export handler, and
the /export route over HTTP (admin only, the same admin only, once, removed at shutdown)."""

from __future__ import annotations

import json
import re
import stat
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from annotation_app import exports, handlers
from annotation_app.exports import ExportRegistry
from annotation_app.handlers import Page
from annotation_app.store import Store
from tests.annotation_app.test_app_http import free_port


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


PASSWORDS = {"ann1": "password-one", "boss": "password-boss", "boss2": "password-boss2"}


def make_store(path) -> Store:
    store = Store(path)
    store.upsert_project("default", quorum=2)
    store.add_items(
        [
            {
                "prompt_id": f"p{i}",
                "prompt": f"prompt {i}",
                "candidates": [{"label": lab, "text": f"answer {lab}{i}"} for lab in "ABC"],
            }
            for i in range(2)
        ]
    )
    store.add_user("ann1", PASSWORDS["ann1"])
    store.add_user("boss", PASSWORDS["boss"], "admin")
    store.add_user("boss2", PASSWORDS["boss2"], "admin")
    item = store.next_item("ann1")
    store.submit("ann1", item.prompt_id, "C > A = B", [], "", "tok")
    return store


@pytest.fixture()
def private_tmp(tmp_path, monkeypatch):
    """Temporary files of the test go under tmp_path: a leftover copy would show there."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_the_registry_keeps_exports_private_to_their_admin_and_short_lived(private_tmp):
    clock = Clock()
    registry = ExportRegistry(lifetime_s=600, clock=clock)
    with registry.new("boss") as export:
        (export.folder / "rankings.jsonl").write_text("{}\n")
    assert stat.S_IMODE(registry.folder.stat().st_mode) == 0o700  # the server's folder: owner only
    assert stat.S_IMODE(export.folder.stat().st_mode) == 0o700
    assert len(export.token) >= 43 and export.url("rankings.jsonl") == f"export/{export.token}/rankings.jsonl"
    assert registry.find(export.token, "boss", "rankings.jsonl") == export.folder / "rankings.jsonl"
    assert registry.find(export.token, "boss2", "rankings.jsonl") is None  # another admin
    for name in ("", ".", "..", "../rankings.jsonl", "x/../rankings.jsonl", "missing.jsonl"):
        assert registry.find(export.token, "boss", name) is None, name
    clock.t += 600
    assert registry.find(export.token, "boss", "rankings.jsonl") is None  # expired
    assert registry.sweep() == 1 and not export.folder.exists()  # and deleted by the sweep
    registry.close()
    assert not list(private_tmp.iterdir())  # nothing left behind


def test_a_failed_export_leaves_nothing_and_a_download_deletes_the_file(private_tmp):
    registry = ExportRegistry()
    with pytest.raises(RuntimeError), registry.new("boss") as failed:
        (failed.folder / "half.jsonl").write_text("{")
        raise RuntimeError("disk full")
    assert not failed.folder.exists() and registry.find(failed.token, "boss", "half.jsonl") is None
    with registry.new("boss") as export:
        for name in ("trl.jsonl", "trl.ties.jsonl"):
            (export.folder / name).write_text("{}\n")
    claimed = registry.claim(export.token, "boss", "trl.jsonl")
    assert claimed.read_text() == "{}\n" and claimed.name.startswith(".sending-")
    assert registry.claim(export.token, "boss", "trl.jsonl") is None  # a download is once only
    assert registry.find(export.token, "boss", claimed.name) is None  # the one being sent is hidden
    registry.delete_file(export.token, claimed.name)
    assert registry.find(export.token, "boss", "trl.ties.jsonl") is not None  # the other file stays
    registry.delete_file(export.token, "trl.ties.jsonl")
    assert not export.folder.exists()  # the export goes with its last file
    registry.close()
    assert not registry.folder and not list(private_tmp.iterdir())


def test_admin_export_answers_a_private_link(private_tmp, monkeypatch):
    registry = ExportRegistry()
    monkeypatch.setattr(exports, "REGISTRY", registry)
    store = make_store(private_tmp / "lab.db")
    page = Page.for_store(store)
    refused = handlers.admin_export(page, "ann1", "rankings")
    assert refused == {"admin-download": "", "admin-message": "Error: this needs an admin account"}
    assert registry.folder is None  # nothing written for a refusal

    out = handlers.admin_export(page, "boss", "pairs")
    assert out["admin-message"] == "Exported 3 pairs records."  # C > A = B: 2 strict pairs + 1 tie
    [(name, url)] = re.findall(r"\[([^\]]+)\]\(([^)]+)\)", out["admin-download"])
    assert name == "pairs.jsonl" and "(3 records)" in out["admin-download"]
    assert "works once, for you only, for 10 minutes" in out["admin-download"]
    token = url.split("/")[1]
    path = registry.find(token, "boss", "pairs.jsonl")
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and sum(json.loads(x)["tie"] for x in lines) == 1
    assert path.parent.parent == registry.folder  # in the private folder, nowhere else
    assert {p.name for p in private_tmp.iterdir()} == {"lab.db", registry.folder.name} | {
        p.name for p in private_tmp.glob("lab.db-*")
    }

    trl = handlers.admin_export(page, "boss", "trl")  # two files: the strict pairs and the ties
    assert re.findall(r"\[([^\]]+)\]", trl["admin-download"]) == ["trl.jsonl", "trl.ties.jsonl"]
    store.close()
    registry.close()


@pytest.fixture()
def server(tmp_path):
    from annotation_app.server import launch

    store = make_store(tmp_path / "lab.db")
    demo, url = launch(store, port=free_port(), block=False, quiet=True)
    yield {"url": url.rstrip("/"), "store": store, "demo": demo}
    demo.close()
    store.close()


def login(server, user: str) -> httpx.Client:
    http = httpx.Client(base_url=server["url"], timeout=30)
    assert http.post("/login", data={"username": user, "password": PASSWORDS[user]}).status_code == 200
    return http


def test_an_export_is_downloaded_once_by_its_admin_only(server):
    page = Page.for_store(server["store"])
    out = handlers.admin_export(page, "boss", "rankings")
    [link] = re.findall(r"\]\(([^)]+)\)", out["admin-download"])
    path = exports.REGISTRY.find(link.split("/")[1], "boss", "rankings.jsonl")
    assert path is not None and path.exists()

    anonymous = httpx.get(f"{server['url']}/{link}", timeout=30)
    assert anonymous.status_code == 401 and anonymous.json()["code"] == "not_logged_in"
    assert login(server, "ann1").get(link).status_code == 403  # not an admin
    other_admin = login(server, "boss2").get(link)
    assert other_admin.status_code == 404 and other_admin.json()["code"] == "no_such_export"
    boss = login(server, "boss")
    assert boss.post(link).status_code == 405 and boss.head(link).status_code == 405

    download = boss.get(link)
    assert download.status_code == 200
    assert download.headers["content-disposition"] == 'attachment; filename="rankings.jsonl"'
    assert download.headers["cache-control"] == "no-store"
    assert json.loads(download.text.splitlines()[0])["ranking"] == "C > A = B"
    deadline = time.time() + 5
    while path.parent.exists() and time.time() < deadline:  # deleted once the response has gone
        time.sleep(0.05)
    assert not path.parent.exists()
    assert boss.get(link).status_code == 404  # once only
    # Gradio's file route does not serve it either (it never went through Gradio's cache).
    assert boss.get(f"/gradio_api/file={path}").status_code in (403, 404)

    # Two requests at once (a double click): one gets the file, the other a clear 404.
    [link] = re.findall(r"\]\(([^)]+)\)", handlers.admin_export(page, "boss", "rankings")["admin-download"])
    with ThreadPoolExecutor(2) as pool:
        statuses = sorted(pool.map(lambda _: login(server, "boss").get(link).status_code, range(2)))
    assert statuses == [200, 404]


def test_the_export_folder_goes_at_server_shutdown(tmp_path):
    from annotation_app.server import launch

    store = make_store(tmp_path / "lab.db")
    demo, _ = launch(store, port=free_port(), block=False, quiet=True)
    page = Page.for_store(store)
    handlers.admin_export(page, "boss", "rankings")
    folder = exports.REGISTRY.folder
    assert folder is not None and any(folder.iterdir())
    demo.close()
    store.close()
    assert not folder.exists() and exports.REGISTRY.folder is None  # the server's shutdown removed it
