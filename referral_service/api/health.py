"""grpc.health.v1 with one change: Watch streams end once the server is shutting down.

grpcio-health-checking's servicer keeps every Watch stream open until the server cancels it, so a
graceful stop would wait the whole grace period for health watchers (load balancers, sidecars) and
then cut them. Here a watcher receives NOT_SERVING and its stream ends with OK, so the graceful
stop waits only for real calls and never has to cancel any."""

from __future__ import annotations

from typing import Any

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer


class GracefulHealthServicer(HealthServicer):
    def status(self, service: str = "") -> int:
        """The serving status last set for ``service`` (``""``: the server as a whole)."""
        base: Any = self
        return int(base._server_status.get(service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN))

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        base: Any = self  # the parent's private state (not in its type stubs)
        condition = base._server_watchers[request.service]
        base._watcher_count_by_service[request.service] += 1
        last_status = None
        try:
            async with condition:
                while True:
                    status = base._server_status.get(
                        request.service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
                    )
                    if status != last_status:
                        await context.write(health_pb2.HealthCheckResponse(status=status))
                    last_status = status
                    if base._gracefully_shutting_down:
                        return
                    await condition.wait()
        finally:
            base._watcher_count_by_service[request.service] -= 1
            if base._watcher_count_by_service[request.service] == 0:
                del base._server_watchers[request.service]
                del base._watcher_count_by_service[request.service]
