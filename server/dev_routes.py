"""Development mode only: the demo identities, with tokens, for the web client's sign-in page.
Registered by server.web_routes only when the config says `dev`; never in production."""

from __future__ import annotations

from aiohttp import web

from rooms.consultations import ConsultationService
from server.auth import TokenService
from server.demo import ensure_demo


def register_dev(app: web.Application, service: ConsultationService, tokens: TokenService) -> None:
    async def identities(_: web.Request) -> web.Response:
        # Reuses the open demo consultation, or makes a new one once the last has ended.
        setup = await ensure_demo(service, tokens)
        c = setup.consultation
        return web.json_response(
            {
                "consultation": {"id": c.id, "status": c.status.value, "reason": c.reason},
                "identities": [
                    {
                        "user_id": who.user_id,
                        "name": who.name,
                        "role": who.role.value,
                        "org": who.org,
                        "token": token,
                    }
                    for who, token in setup.tokens
                ],
            },
            headers={"Cache-Control": "no-store"},
        )

    app.router.add_get("/dev/identities", identities)
