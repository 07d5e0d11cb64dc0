"""Deleting a tenant completely, also against writes already in flight.

A delete must leave nothing of the tenant: no key, adapter, job or event, and nothing a
tenant created again under the same name could see. The hard part is a write that
authenticated before the delete and lands after it: an adapter upload whose body was
still streaming, a job submitted at that moment, a worker publishing a job's adapter.

The delete runs in this order (`delete_tenant`):

    1. remove the registry entry (and its keys): from here on `is_current` is False for
       the old incarnation, and no request authenticates as it;
    2. remove the tenant's jobs (`JobQueue.remove`), then its uploaded files
       (`FileStore.remove`; an upload re-checks as a job submission does);
    3. sweep the tenant's adapters.

Every in-flight write re-checks after it wrote, and undoes its own write if the check
fails:

- an upload or a job submission re-checks `is_current(tenant, incarnation)` after its
  put. If that re-check ran before step 1, the put ran before step 1 too, so before the
  sweep (3) or the job removal (2), which then remove it. If it ran after step 1, it
  answers False and the request removes what it wrote (`withdraw_adapter`, or the job)
  and answers 401. Either way the write does not survive.
- a worker publishes with `store.put` then `queue.finish`, whose ownership check is atomic
  with step 2 on the job's record. If `finish` succeeded, it ran before step 2, so the
  put ran before the sweep (3), which removes it. If the job was gone, the worker
  withdraws its put. A running job's worker also sees at its next heartbeat that the
  job is gone and stops training.

The incarnation (random, per creation) rather than the name is what is compared, so a
tenant created again between the delete and the re-check is not mistaken for the old
one. What is left: `withdraw_adapter` compares then deletes in two store calls, so a
new incarnation that pushes the same adapter name in the instant between them would
lose that push (it would have to be created and push within milliseconds of the old
one's delete).
"""

from __future__ import annotations

import contextlib
from typing import Protocol

from vbserve_store import AdapterNotFoundError
from vbserve_store.store import AdapterRecord, AdapterStore

from .registry import TenantRegistry


class TenantData(Protocol):
    """What else holds a tenant's data (the job queue, the uploaded-files store): tenancy
    sits below training, so it names only the one method a delete needs."""

    def remove(self, tenant: str) -> int: ...


def delete_tenant(
    registry: TenantRegistry, store: AdapterStore, jobs: TenantData | None, files: TenantData | None, name: str
) -> None:
    """Delete the tenant, its keys, jobs (a running one stops and publishes nothing),
    uploaded files and adapters, in the order the module doc argues. `TenantNotFoundError`
    if absent."""
    registry.delete_tenant(name)
    if jobs is not None:
        jobs.remove(name)
    if files is not None:
        files.remove(name)
    while page := store.list(name, limit=1000):
        for record in page:
            with contextlib.suppress(AdapterNotFoundError):  # deleted meanwhile by another request
                store.delete(name, record.name)


def withdraw_adapter(store: AdapterStore, tenant: str, name: str, written: AdapterRecord) -> None:
    """Delete (tenant, name) if it still holds the version `written`: a put that landed
    after its tenant was deleted. Any other version (the sweep took ours already, a new
    incarnation wrote its own) is left alone."""
    with contextlib.suppress(AdapterNotFoundError):
        current = store.get_record(tenant, name)
        if (current.version, current.bank_id, current.updated) == (written.version, written.bank_id, written.updated):
            store.delete(tenant, name)
