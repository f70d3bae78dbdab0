"""Development mode: a ready demo consultation and one token per role, printed at start-up."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from rooms.consultations import ConsultationService, NewConsultation, NewTeamMember, RequestContext
from rooms.lifecycle import Action
from rooms.model import Consultation, ConsultationKind, ConsultationStatus, Resident, Sex, UserId
from rooms.policy import Actor
from rooms.roles import Role
from rooms.store import ConsultationFilter
from server.auth import TokenService

DEMO_RESIDENT = "demo-resident-0001"


@dataclass(frozen=True)
class DemoIdentity:
    user_id: UserId
    name: str
    role: Role
    org: str

    def actor(self) -> Actor:
        return Actor(self.user_id, self.name, self.role, self.org)


VILLAGE = DemoIdentity(UserId("demo-village-doctor"), "王村医", Role.VILLAGE_DOCTOR, "莲花村卫生室")
TOWNSHIP = DemoIdentity(
    UserId("demo-township-doctor"), "李医生", Role.TOWNSHIP_DOCTOR, "新镇卫生院"
)
COUNTY = DemoIdentity(
    UserId("demo-county-physician"), "张医生", Role.COUNTY_PHYSICIAN, "安县人民医院"
)
SPECIALIST = DemoIdentity(
    UserId("demo-provincial-specialist"), "陈教授", Role.PROVINCIAL_SPECIALIST, "省人民医院"
)
COORDINATOR = DemoIdentity(UserId("demo-coordinator"), "赵协调员", Role.COORDINATOR, "莲花村卫生室")
ADMIN = DemoIdentity(UserId("demo-admin"), "运维管理员", Role.ADMIN, "安县医共体")
STAFF = (VILLAGE, TOWNSHIP, COUNTY, SPECIALIST, COORDINATOR, ADMIN)


@dataclass(frozen=True)
class DemoSetup:
    consultation: Consultation
    tokens: list[tuple[DemoIdentity, str]]


async def ensure_demo(service: ConsultationService, tokens: TokenService) -> DemoSetup:
    """Reuses the open demo consultation, or requests, accepts and schedules a new one."""
    consultation = await _open_demo(service)
    if consultation is None:
        consultation = await _create_demo(service)
    issued = [
        (who, tokens.mint(user_id=who.user_id, name=who.name, role=who.role, org=who.org))
        for who in STAFF
    ]
    invite = await service.prepare_invite(
        RequestContext(VILLAGE.actor()), consultation.id, Role.RESIDENT, None, timedelta(hours=2)
    )
    resident_token, _ = tokens.mint_invite(
        user_id=invite.user_id,
        name=invite.name,
        role=invite.role,
        org=invite.org,
        consultation=invite.consultation_id,
        jti=invite.jti,
    )
    resident = DemoIdentity(invite.user_id, invite.name, Role.RESIDENT, invite.org)
    return DemoSetup(consultation, [*issued, (resident, resident_token)])


async def _open_demo(service: ConsultationService) -> Consultation | None:
    found = await service.list_visible(
        RequestContext(VILLAGE.actor()), ConsultationFilter(limit=500)
    )
    usable = {ConsultationStatus.SCHEDULED, ConsultationStatus.LIVE}
    return next(
        (c for c in found if c.resident.pseudonym == DEMO_RESIDENT and c.status in usable), None
    )


async def _create_demo(service: ConsultationService) -> Consultation:
    village = RequestContext(VILLAGE.actor())
    consultation = await service.create(
        village,
        NewConsultation(
            kind=ConsultationKind.CONSULTATION,
            specialty="respiratory",
            resident=Resident(DEMO_RESIDENT, "刘奶奶", 72, Sex.FEMALE),
            reason="反复咳嗽、气短两个月",
            purpose="明确诊断并调整治疗方案",
            case_summary="COPD 病史 8 年；近两月活动后气短加重，SpO2 92%。",
            requested_specialty="respiratory",
            requested_title="主任医师",
            preferred_time=None,
            team=[
                NewTeamMember(m.user_id, m.name, m.role, m.org)
                for m in (TOWNSHIP, COUNTY, SPECIALIST)
            ],
        ),
    )
    county = RequestContext(COUNTY.actor())
    await service.transition(county, consultation.id, Action.ACCEPT)
    return await service.transition(
        county, consultation.id, Action.SCHEDULE, scheduled_time=consultation.created_at
    )


def describe(setup: DemoSetup, public_url: str) -> str:
    c = setup.consultation
    lines = [
        "",
        f"Demo consultation {c.id} ({c.status.value}): {c.resident.display_name}, {c.reason}",
        "Demo identities (development mode only) — use a token as `Authorization: Bearer <token>`:",
    ]
    for who, token in setup.tokens:
        lines.append(f"  {who.role.value:<22} {who.name} ({who.org})")
        lines.append(f"    {token}")
    lines += [
        "Try:",
        f'  curl -H "Authorization: Bearer $TOKEN" {public_url}/api/v1/consultations/{c.id}/record',
        "",
    ]
    return "\n".join(lines)
