"""The HTTP edge of a launched studio with a login: no route map before login, 404 for
an unknown endpoint, and a rate limit on failed logins."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture
def public_app(settings):
    from conftest import launch_app

    settings.auth = [("alice", "right-password")]
    app, url = launch_app(settings)
    try:
        yield url
    finally:
        app.close()


def test_login_page_routes_and_rate_limit(public_app):
    import httpx

    with httpx.Client(base_url=public_app, timeout=30) as anon:
        for path in ("/openapi.json", "/docs", "/gradio_api/info", "/config"):
            response = anon.get(path)
            assert response.status_code in (401, 404), path
            assert "/generate" not in response.text and "start_training" not in response.text, path
    with httpx.Client(base_url=public_app, timeout=30) as alice:
        assert alice.post("/login", data={"username": "alice", "password": "right-password"}).status_code == 200
        for path in ("/gradio_api/call/no_such_endpoint", "/gradio_api/run/no_such_endpoint"):
            response = alice.post(path, json={"data": []})
            assert response.status_code == 404 and "no_such_endpoint" in response.json()["detail"], path
        assert "/generate" in alice.get("/gradio_api/info").text  # the API map, after login
    with httpx.Client(base_url=public_app, timeout=30) as mallory:
        codes = [mallory.post("/login", data={"username": "alice", "password": f"guess{i}"}).status_code
                 for i in range(7)]
        assert codes == [400] * 5 + [429] * 2
        refused = mallory.post("/login", data={"username": "alice", "password": "right-password"})
        assert refused.status_code == 429 and "Too many failed logins" in refused.json()["detail"]
