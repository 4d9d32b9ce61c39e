"""insloc_hub.hub's error table: each documented huggingface_hub exception -> one actionable error (no network)."""

from __future__ import annotations

import httpx2
import pytest
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from insloc_hub import hub
from insloc_hub.errors import HubAccessError, ModelNotFoundError

ENDPOINT = "http://hub.test"
REF = hub.ModelRef(kind="hub", repo_id="me/det", revision="v1")
ALIAS = hub.parse_model_name("insloc-r50")


def _http(cls: type[HfHubHTTPError], status: int) -> HfHubHTTPError:
    response = httpx2.Response(status, request=httpx2.Request("GET", f"{ENDPOINT}/api/models/me/det"))
    return cls(f"{status} from the Hub", response=response)


ROWS = [  # (exception, ref, expected class, what the message must say)
    (_http(GatedRepoError, 404), REF, HubAccessError, ["gated repo", f"{ENDPOINT}/me/det", "HF_TOKEN"]),
    (_http(RepositoryNotFoundError, 404), REF, ModelNotFoundError, ["'me/det' was not found", "hf auth login"]),
    (_http(RevisionNotFoundError, 404), REF, ModelNotFoundError, ["Revision 'v1' does not exist", "/tree/main"]),
    (_http(RemoteEntryNotFoundError, 404), REF, ModelNotFoundError, ["has no config.json", "insloc-hub push"]),
    (IncompleteSnapshotError("partial", snapshot_path="/x"), REF, ModelNotFoundError,
     ["not complete in the local cache (config.json missing)", "insloc-hub download me/det --revision v1"]),
    (LocalEntryNotFoundError("not cached"), REF, ModelNotFoundError,
     ["(config.json missing)", "HF_HUB_OFFLINE=1", "insloc-hub download me/det --revision v1"]),
    (LocalEntryNotFoundError("not cached"), ALIAS, ModelNotFoundError,
     ["insloc-hub/insloc-r50-fpn-200ep", "insloc-hub convert official <checkpoint.pth>"]),
    (OfflineModeIsEnabled("offline"), REF, ModelNotFoundError, ["offline mode is enabled", "Unset it"]),
    (httpx2.ConnectError("connection refused"), REF, ModelNotFoundError,
     [f"Could not reach the Hub at {ENDPOINT}", "connection refused", "HF_ENDPOINT"]),
    (_http(HfHubHTTPError, 500), REF, ModelNotFoundError, ["answered HTTP 500", "Retry later"]),
    (_http(HfHubHTTPError, 401), REF, HubAccessError, ["rejected the token (HTTP 401)", "HF_TOKEN"]),
    (_http(HfHubHTTPError, 403), REF, HubAccessError, ["denied access (HTTP 403)", "allowed to fetch 'me/det'"]),
]


@pytest.mark.parametrize(("exc", "ref", "cls", "phrases"), ROWS, ids=[f"{type(r[0]).__name__}-{i}" for i, r in
                                                                        enumerate(ROWS)])
def test_each_table_row(exc, ref, cls, phrases):
    error = hub._translate_error(exc, ref, endpoint=ENDPOINT, detail="config.json")
    assert type(error) is cls
    for phrase in phrases:
        assert phrase in str(error)


def test_every_row_is_covered_and_a_401_inside_a_cache_miss_is_still_an_access_error():
    covered = {type(exc) for exc, *_ in ROWS}
    assert all(any(issubclass(t, row[0]) for t in covered) for row in hub._ERROR_TABLE)
    try:
        try:
            raise _http(HfHubHTTPError, 401)
        except HfHubHTTPError as inner:
            raise LocalEntryNotFoundError("cannot find the file") from inner
    except LocalEntryNotFoundError as outer:
        assert isinstance(hub._translate_error(outer, REF, endpoint=ENDPOINT), HubAccessError)
