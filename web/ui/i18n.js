// Strings in English and Simplified Chinese, chosen by the browser's language unless the person
// picked one (kept in localStorage).

/** @type {[string, string][]} */
export const LANGS = [["zh-CN", "中文"], ["en", "English"]];

const ROLES = {
  en: { resident: "Resident", guardian: "Guardian", village_doctor: "Village doctor", township_doctor: "Township doctor",
    county_physician: "County physician", provincial_specialist: "Provincial specialist", trainee: "Trainee",
    coordinator: "Coordinator", admin: "Administrator", recorder: "Recorder" },
  zh: { resident: "居民", guardian: "监护人", village_doctor: "村医", township_doctor: "乡镇医生", county_physician: "县医院医生",
    provincial_specialist: "省级专家", trainee: "学员", coordinator: "协调员", admin: "管理员", recorder: "录制" },
};

/** @type {Record<string, Record<string, string>>} */
const STRINGS = {
  en: {
    skip: "Skip to content", app: "Telemed", language: "Language", ok: "OK", cancel: "Cancel", yes: "yes", no: "no",
    signIn: "Sign in", signOut: "Sign out", toList: "Consultations", openRecord: "Open the record",
    "dev.title": "Development mode: choose who you are",
    "dev.text": "Demo consultation {id}: {reason}. Each button signs you in as one demo identity.",
    "admin.title": "Nothing here for administrators", "admin.text": "This client has no administration pages; use the API for the audit log.",
    "err.noLinkTitle": "No sign-in", "err.noLink": "Open the link you were sent: it signs you in.",
    "err.linkTitle": "This link cannot be used", "err.expired": "The link has expired. Ask for a new one.",
    "err.otherConsultation": "This link belongs to another consultation.", "err.revoked": "This invitation was withdrawn. Ask for a new one.",
    "err.refused": "The server refused the link ({reason}).", "err.joinTitle": "Could not join",
    "err.apiTitle": "Could not load", "err.apiExpired": "Your sign-in has expired or was refused. Sign in again.",
    "err.apiRefused": "Refused:",
    "list.title": "Consultations", "list.filters": "Filters", "list.status": "Status", "list.all": "All",
    "list.institution": "Institution", "list.none": "No consultations.", "list.accept": "Accept",
    "list.scheduleAt": "Time", "list.schedule": "Schedule", "list.scheduled": "scheduled", "list.team": "Team",
    "list.inviteRole": "Invite", "list.inviteName": "Name", "list.invite": "Create link", "list.inviteLink": "Invitation link",
    "list.invited": "Link and code for a {role}, valid until {until}:", "list.copy": "Copy", "list.copied": "Copied.",
    "list.qrAlt": "QR code of the invitation link: scan it with the phone's camera",
    "list.codeHint": "Or read out this code; it is typed at {page}:",
    "join.heading": "Join a consultation", "join.title": "Enter your invitation code",
    "join.intro": "Your doctor gave you a code of 8 letters and digits.", "join.label": "Invitation code",
    "join.hint": "Capital or small letters, with or without the dash.", "join.submit": "Continue",
    "join.bad": "A code has 8 letters and digits, like K7QM-3XRD. Check it and try again.",
    "join.unknown": "No invitation has this code. Check it, or ask your doctor for a new one.",
    "join.tooMany": "Too many tries. Wait {minutes} min and try again, or ask your doctor for the link.",
    "join.failed": "The code could not be checked ({reason}).",
    "pre.invitee": "Allow the camera and microphone when your phone asks. The doctor will let you in.",
    "pre.settings": "Camera, microphone and network",
    "list.openRoom": "Open the room", "list.openRecord": "Record",
    "new.title": "Request a consultation", "new.kind": "Kind", "new.specialty": "Specialty", "new.rtitle": "Requested title",
    "new.pseudonym": "Resident's pseudonym", "new.resident": "Resident's name", "new.age": "Age", "new.sex": "Sex",
    "new.reason": "Reason", "new.purpose": "Purpose", "new.summary": "Case summary", "new.team": "Invited team",
    "new.memberUser": "User id", "new.memberName": "Name", "new.memberRole": "Role", "new.memberInstitution": "Institution",
    "new.addMember": "Add a team member", "new.submit": "Send the request", "new.done": "Request sent.",
    "pre.title": "Before you join", "pre.preview": "Your camera", "pre.camera": "Camera", "pre.microphone": "Microphone",
    "pre.level": "Microphone level", "pre.join": "Join", "pre.watchOnly": "You will watch and listen; you do not send video or sound.",
    "pre.noDevices": "Camera or microphone not available: {reason}",
    "net.running": "Checking the network…", "net.ok": "Network ready.", "net.problem": "Network problem.",
    "net.server": "The server answers in {ms} ms.", "net.noServer": "The server does not answer.",
    "net.media": "Media: {n} network path(s) found.", "net.noMedia": "Media: no network path found; video may not work.",
    "pre.notStartedTitle": "Not started yet", "pre.notStarted": "The doctor has not opened the session yet. You will be let in when it starts.",
    "wait.title": "Waiting room", "wait.text": "Please wait: a doctor will let you in shortly.",
    "wait.arrived": "{name} is in the waiting room.", "wait.deniedTitle": "Not admitted",
    "wait.denied": "The doctor did not admit you to this session.", "wait.deniedReason": "The doctor did not admit you: {reason}",
    "room.title": "Consultation room", "room.videos": "Videos", "room.controls": "Call controls",
    "room.recordingOn": "● Recording", "room.reconnecting": "Connection lost — reconnecting…", "room.reconnected": "Reconnected.",
    "room.left": "{name} left ({reason}).", "room.handRaised": "{name} raised a hand.",
    "room.youAudioMuted": "A moderator muted your microphone.", "room.youVideoMuted": "A moderator turned off your camera for others.",
    "room.removedTitle": "Removed", "room.removed": "A moderator removed you from the session: {reason}",
    "room.endedTitle": "The session has ended", "room.ended": "The session was ended.", "room.endedEmpty": "The session ended: no clinician was left.",
    "room.leftTitle": "You left", "room.youLeft": "You left the session.",
    "room.layerChanged": "Your connection is weak: now receiving {layer}.", "room.mediaRestart": "Media connection lost; reconnecting…", "room.mediaReconnecting": "Reconnecting media…",
    "room.publishFailed": "Your camera and microphone could not be sent: {reason}",
    "tb.mute": "Mute", "tb.unmute": "Unmute", "tb.camOff": "Camera off", "tb.camOn": "Camera on",
    "tb.secondOn": "Second camera", "tb.secondOff": "Stop second camera", "tb.secondTitle": "Choose the second camera",
    "tb.screenOn": "Share screen", "tb.screenOff": "Stop sharing", "tb.raiseHand": "Raise hand", "tb.lowerHand": "Lower hand",
    "tb.draw": "Draw", "tb.drawHelp": "Draw on a video with the mouse or a finger; everyone sees it.", "tb.drawOff": "Drawing off.",
    "tb.consent": "Consent", "tb.startRec": "Record", "tb.stopRec": "Stop recording", "tb.layer": "Video quality",
    "tb.leave": "Leave", "tb.end": "End session", "tb.endConfirm": "End the session for everyone?",
    "tile.clear": "Clear drawing",
    "people.title": "Participants", "people.waiting": "Waiting ({n})", "people.inRoom": "In the room ({n})",
    "people.admit": "Admit", "people.deny": "Deny", "people.admitWho": "Admit {name}", "people.denyWho": "Deny {name}",
    "people.muteAudio": "Mute", "people.muteVideo": "Stop video", "people.muteAudioWho": "Mute {name}", "people.muteVideoWho": "Stop {name}'s video",
    "people.remove": "Remove", "people.removeWho": "Remove {name}", "people.reason": "Reason",
    "people.audioMuted": "muted", "people.videoMuted": "video off", "people.away": "reconnecting", "people.you": "you",
    "chat.title": "Chat", "chat.message": "Message", "chat.send": "Send", "chat.closed": "Chat is closed to trainees.",
    "chat.traineeChat": "Trainees may chat",
    "consent.title": "Consent", "consent.intro": "Each consent is separate and can be withdrawn at any time.",
    "consent.ask.consultation": "I agree to this remote consultation.", "consent.ask.recording": "I agree that the session is recorded.",
    "consent.ask.teaching": "I agree that the recording is used for teaching.", "consent.save": "Save",
    "consent.consultation": "consultation", "consent.recording": "recording", "consent.teaching": "teaching use",
    "consent.given": "given", "consent.withdrawn": "withdrawn", "consent.recorded": "Consent to {kind} {value}.", "consent.state": "Consent:",
    "rec.stopped.stopped": "Recording stopped.", "rec.stopped.consent_withdrawn": "Recording stopped: consent was withdrawn.",
    "rec.stopped.session_ended": "Recording stopped: the session ended.",
    "rec.title": "Consultation record", "rec.purpose": "Purpose", "rec.summary": "Case summary", "rec.sessions": "Sessions",
    "rec.session": "Session {n}: {start} – {end}", "rec.name": "Name", "rec.role": "Role", "rec.device": "Device",
    "rec.joined": "Joined", "rec.leftAt": "Left", "rec.reason": "Why", "rec.consents": "Consents", "rec.when": "When",
    "rec.kind": "Kind", "rec.value": "Given", "rec.givenBy": "By", "rec.none": "None.", "rec.timeline": "Timeline",
    "rec.stroke": "a stroke of {n} points", "rec.recordings": "Recording", "rec.noRecordings": "No finished recording.",
    "rec.play": "Play", "rec.player": "Recording of the session",
    "rec.rendering": "Being prepared: {pct} %", "rec.pending": "The recording is being prepared.", "rec.failed": "The recording could not be made.",
    "op.title": "Opinion", "op.version": "Version {n} ({at})", "op.amendmentReason": "Reason for the amendment",
    "op.findings": "Findings", "op.assessment": "Assessment", "op.recommendations": "Recommendations",
    "op.referral_advice": "Referral advice", "op.amendment_reason": "Reason for the amendment",
    "op.signedBy": "signed by {name} at {at}", "op.unsigned": "not signed", "op.none": "No opinion yet.",
    "op.sign": "Sign version {n}", "op.write": "Write the opinion", "op.amend": "Amend the signed opinion",
    "op.save": "Save the opinion", "op.saveAmendment": "Save the amendment",
    "dec.title": "Final decision", "dec.none": "No decision yet.", "dec.label": "Decision", "dec.save": "Record the decision",
    "fhir.title": "Export", "fhir.download": "Download FHIR bundle",
  },
  "zh-CN": {
    skip: "跳到主要内容", app: "远程会诊", language: "语言", ok: "确定", cancel: "取消", yes: "是", no: "否",
    signIn: "登录", signOut: "退出", toList: "会诊列表", openRecord: "查看记录",
    "dev.title": "开发模式：选择身份",
    "dev.text": "演示会诊 {id}：{reason}。点击按钮即以该演示身份登录。",
    "admin.title": "管理员无可用页面", "admin.text": "本客户端没有管理页面；审计日志请使用 API。",
    "err.noLinkTitle": "未登录", "err.noLink": "请打开您收到的链接，链接会为您登录。",
    "err.linkTitle": "此链接无法使用", "err.expired": "链接已过期，请索取新链接。",
    "err.otherConsultation": "此链接属于另一次会诊。", "err.revoked": "此邀请已被撤回，请索取新链接。",
    "err.refused": "服务器拒绝了此链接（{reason}）。", "err.joinTitle": "无法加入",
    "err.apiTitle": "无法加载", "err.apiExpired": "登录已过期或被拒绝，请重新登录。", "err.apiRefused": "被拒绝：",
    "list.title": "会诊列表", "list.filters": "筛选", "list.status": "状态", "list.all": "全部",
    "list.institution": "机构", "list.none": "暂无会诊。", "list.accept": "接受",
    "list.scheduleAt": "时间", "list.schedule": "排期", "list.scheduled": "排期", "list.team": "团队",
    "list.inviteRole": "邀请", "list.inviteName": "姓名", "list.invite": "生成链接", "list.inviteLink": "邀请链接",
    "list.invited": "{role}的链接和邀请码，有效期至 {until}：", "list.copy": "复制", "list.copied": "已复制。",
    "list.qrAlt": "邀请链接的二维码：用手机相机扫描",
    "list.codeHint": "或者念出这个邀请码，在 {page} 输入：",
    "join.heading": "加入会诊", "join.title": "输入邀请码",
    "join.intro": "医生给了您一个由 8 个字母和数字组成的邀请码。", "join.label": "邀请码",
    "join.hint": "大小写均可，可带或不带短横线。", "join.submit": "继续",
    "join.bad": "邀请码由 8 个字母和数字组成，例如 K7QM-3XRD。请核对后重试。",
    "join.unknown": "没有与此邀请码对应的邀请。请核对，或向医生索取新的邀请。",
    "join.tooMany": "尝试次数过多。请等待 {minutes} 分钟后再试，或向医生索取链接。",
    "join.failed": "无法核对邀请码（{reason}）。",
    "pre.invitee": "手机询问时，请允许使用摄像头和麦克风。医生会让您进入。",
    "pre.settings": "摄像头、麦克风和网络",
    "list.openRoom": "进入会诊室", "list.openRecord": "记录",
    "new.title": "发起会诊申请", "new.kind": "类型", "new.specialty": "专科", "new.rtitle": "所需职称",
    "new.pseudonym": "居民化名编号", "new.resident": "居民姓名", "new.age": "年龄", "new.sex": "性别",
    "new.reason": "会诊原因", "new.purpose": "会诊目的", "new.summary": "病历摘要", "new.team": "受邀团队",
    "new.memberUser": "用户 ID", "new.memberName": "姓名", "new.memberRole": "角色", "new.memberInstitution": "机构",
    "new.addMember": "添加团队成员", "new.submit": "提交申请", "new.done": "申请已提交。",
    "pre.title": "加入前检查", "pre.preview": "您的摄像头", "pre.camera": "摄像头", "pre.microphone": "麦克风",
    "pre.level": "麦克风音量", "pre.join": "加入", "pre.watchOnly": "您将观看和收听，不发送视频或声音。",
    "pre.noDevices": "摄像头或麦克风不可用：{reason}",
    "net.running": "正在检查网络…", "net.ok": "网络正常。", "net.problem": "网络有问题。",
    "net.server": "服务器响应时间 {ms} 毫秒。", "net.noServer": "服务器没有响应。",
    "net.media": "音视频：找到 {n} 条网络路径。", "net.noMedia": "音视频：未找到网络路径，视频可能无法使用。",
    "pre.notStartedTitle": "尚未开始", "pre.notStarted": "医生还没有开启本次会诊，开始后您将自动进入。",
    "wait.title": "候诊室", "wait.text": "请稍候，医生很快会让您进入。",
    "wait.arrived": "{name} 在候诊室等候。", "wait.deniedTitle": "未被准入",
    "wait.denied": "医生未准许您进入本次会诊。", "wait.deniedReason": "医生未准许您进入：{reason}",
    "room.title": "会诊室", "room.videos": "视频", "room.controls": "通话控制",
    "room.recordingOn": "● 正在录制", "room.reconnecting": "连接中断，正在重新连接…", "room.reconnected": "已重新连接。",
    "room.left": "{name} 已离开（{reason}）。", "room.handRaised": "{name} 举手了。",
    "room.youAudioMuted": "主持人已将您静音。", "room.youVideoMuted": "主持人已停止向他人转发您的视频。",
    "room.removedTitle": "已被移出", "room.removed": "主持人已将您移出会诊：{reason}",
    "room.endedTitle": "会诊已结束", "room.ended": "本次会诊已结束。", "room.endedEmpty": "会诊已结束：没有临床医生在场。",
    "room.leftTitle": "您已离开", "room.youLeft": "您已离开本次会诊。",
    "room.layerChanged": "您的网络较差，现在接收：{layer}。", "room.mediaRestart": "媒体连接中断，正在重新连接…", "room.mediaReconnecting": "正在重新连接音视频…",
    "room.publishFailed": "无法发送您的摄像头和麦克风：{reason}",
    "tb.mute": "静音", "tb.unmute": "取消静音", "tb.camOff": "关闭摄像头", "tb.camOn": "打开摄像头",
    "tb.secondOn": "第二摄像头", "tb.secondOff": "关闭第二摄像头", "tb.secondTitle": "选择第二个摄像头",
    "tb.screenOn": "共享屏幕", "tb.screenOff": "停止共享", "tb.raiseHand": "举手", "tb.lowerHand": "放下手",
    "tb.draw": "标注", "tb.drawHelp": "用鼠标或手指在视频上标注，所有人都能看到。", "tb.drawOff": "已关闭标注。",
    "tb.consent": "知情同意", "tb.startRec": "录制", "tb.stopRec": "停止录制", "tb.layer": "视频质量",
    "tb.leave": "离开", "tb.end": "结束会诊", "tb.endConfirm": "为所有人结束本次会诊？",
    "tile.clear": "清除标注",
    "people.title": "参会人员", "people.waiting": "候诊（{n}）", "people.inRoom": "会诊室内（{n}）",
    "people.admit": "准入", "people.deny": "拒绝", "people.admitWho": "准许 {name} 进入", "people.denyWho": "拒绝 {name}",
    "people.muteAudio": "静音", "people.muteVideo": "停止视频", "people.muteAudioWho": "将 {name} 静音", "people.muteVideoWho": "停止 {name} 的视频",
    "people.remove": "移出", "people.removeWho": "移出 {name}", "people.reason": "原因",
    "people.audioMuted": "已静音", "people.videoMuted": "视频已关", "people.away": "重连中", "people.you": "我",
    "chat.title": "聊天", "chat.message": "消息", "chat.send": "发送", "chat.closed": "学员聊天已关闭。",
    "chat.traineeChat": "允许学员聊天",
    "consent.title": "知情同意", "consent.intro": "每项同意相互独立，可随时撤回。",
    "consent.ask.consultation": "我同意进行本次远程会诊。", "consent.ask.recording": "我同意对本次会诊录像。",
    "consent.ask.teaching": "我同意将录像用于教学。", "consent.save": "保存",
    "consent.consultation": "会诊", "consent.recording": "录制", "consent.teaching": "教学使用",
    "consent.given": "已同意", "consent.withdrawn": "已撤回", "consent.recorded": "{kind}知情同意：{value}。", "consent.state": "知情同意：",
    "rec.stopped.stopped": "录制已停止。", "rec.stopped.consent_withdrawn": "录制已停止：同意已撤回。",
    "rec.stopped.session_ended": "录制已停止：会诊已结束。",
    "rec.title": "会诊记录", "rec.purpose": "会诊目的", "rec.summary": "病历摘要", "rec.sessions": "会诊场次",
    "rec.session": "第 {n} 场：{start} – {end}", "rec.name": "姓名", "rec.role": "角色", "rec.device": "设备",
    "rec.joined": "加入", "rec.leftAt": "离开", "rec.reason": "原因", "rec.consents": "知情同意", "rec.when": "时间",
    "rec.kind": "类别", "rec.value": "状态", "rec.givenBy": "签署人", "rec.none": "无。", "rec.timeline": "时间线",
    "rec.stroke": "{n} 个点的标注", "rec.recordings": "录像", "rec.noRecordings": "没有已完成的录像。",
    "rec.play": "播放", "rec.player": "会诊录像",
    "rec.rendering": "正在生成：{pct} %", "rec.pending": "录像正在生成。", "rec.failed": "录像生成失败。",
    "op.title": "会诊意见", "op.version": "第 {n} 版（{at}）", "op.amendmentReason": "修订原因",
    "op.findings": "所见", "op.assessment": "评估", "op.recommendations": "建议",
    "op.referral_advice": "转诊建议", "op.amendment_reason": "修订原因",
    "op.signedBy": "{name} 于 {at} 签署", "op.unsigned": "未签署", "op.none": "尚无会诊意见。",
    "op.sign": "签署第 {n} 版", "op.write": "撰写会诊意见", "op.amend": "修订已签署的意见",
    "op.save": "保存意见", "op.saveAmendment": "保存修订",
    "dec.title": "最终决定", "dec.none": "尚无决定。", "dec.label": "决定", "dec.save": "记录决定",
    "fhir.title": "导出", "fhir.download": "下载 FHIR 文档",
  },
};

/** Words that come in families: statuses, kinds, reasons, events, codes. */
const FAMILIES = {
  en: {
    status: { requested: "requested", accepted: "accepted", declined: "declined", scheduled: "scheduled", live: "live",
      opinion_pending: "opinion pending", signed: "signed", archived: "archived", cancelled: "cancelled", aborted: "aborted" },
    kind: { consultation: "Consultation", telementoring: "Telementoring", teaching: "Teaching" },
    sex: { female: "female", male: "male", other: "other", unknown: "unknown" },
    reason: { left: "left", kicked: "removed", network_lost: "network lost", duplicate: "duplicate", session_ended: "session ended", denied: "denied" },
    layer: { auto: "Automatic", full: "Full", low: "Low bandwidth", audio_only: "Audio only" },
    source: { camera: "camera", field_camera: "second camera", screen: "screen", microphone: "microphone" },
    quality: { good: "Connection good", fair: "Connection fair", poor: "Connection poor", unknown: "Connection —" },
    event: { session_started: "Session started", session_ended: "Session ended", joined: "Joined", left: "Left",
      waiting: "Waiting", admitted: "Admitted", denied: "Denied", chat: "Chat", chat_settings: "Trainee chat set",
      hand_raised: "Hand raised", hand_lowered: "Hand lowered", muted: "Muted", removed: "Removed", consent: "Consent",
      annotation: "Annotation", recording_started: "Recording started", recording_stopped: "Recording stopped" },
    code: { forbidden: "You are not allowed to do that.", consent_missing: "The resident has not consented to recording.",
      already_recording: "Already recording.", not_recording: "Not recording.", rate_limited: "Too fast; try again in a moment.",
      removed: "You were removed from this session.", room_full: "The room is full.", not_joinable: "This consultation cannot be joined now.",
      not_live: "The session is over.", chat_closed: "Chat is closed to trainees.", chat_too_long: "The message is too long.",
      recording_unavailable: "This server cannot record.", token_expired: "Your link has expired.", not_found: "No such consultation.", timeout: "The server did not answer.",
      disconnected: "Not connected to the server; reconnecting." },
  },
  "zh-CN": {
    status: { requested: "已申请", accepted: "已接受", declined: "已拒绝", scheduled: "已排期", live: "进行中",
      opinion_pending: "待出具意见", signed: "已签署", archived: "已归档", cancelled: "已取消", aborted: "已中止" },
    kind: { consultation: "远程会诊", telementoring: "手术指导", teaching: "远程教学" },
    sex: { female: "女", male: "男", other: "其他", unknown: "未知" },
    reason: { left: "离开", kicked: "被移出", network_lost: "网络中断", duplicate: "重复连接", session_ended: "会诊结束", denied: "被拒绝" },
    layer: { auto: "自动", full: "高清", low: "低带宽", audio_only: "仅音频" },
    source: { camera: "摄像头", field_camera: "第二摄像头", screen: "屏幕", microphone: "麦克风" },
    quality: { good: "网络良好", fair: "网络一般", poor: "网络较差", unknown: "网络 —" },
    event: { session_started: "会诊开始", session_ended: "会诊结束", joined: "加入", left: "离开",
      waiting: "候诊", admitted: "准入", denied: "拒绝", chat: "聊天", chat_settings: "学员聊天设置",
      hand_raised: "举手", hand_lowered: "放下手", muted: "静音", removed: "移出", consent: "知情同意",
      annotation: "标注", recording_started: "开始录制", recording_stopped: "停止录制" },
    code: { forbidden: "您无权执行此操作。", consent_missing: "居民尚未同意录制。",
      already_recording: "已在录制。", not_recording: "当前未录制。", rate_limited: "操作过快，请稍后再试。",
      removed: "您已被移出本次会诊。", room_full: "会诊室已满。", not_joinable: "此会诊现在无法加入。",
      not_live: "会诊已结束。", chat_closed: "学员聊天已关闭。", chat_too_long: "消息过长。",
      recording_unavailable: "此服务器无法录制。", token_expired: "您的链接已过期。", not_found: "没有该会诊。", timeout: "服务器没有响应。",
      disconnected: "与服务器的连接已断开，正在重新连接。" },
  },
};

function chosen() {
  const saved = localStorage.getItem("telemed.lang");
  if (saved && saved in STRINGS) return saved;
  return (navigator.languages ?? [navigator.language]).some((l) => l.toLowerCase().startsWith("zh")) ? "zh-CN" : "en";
}

let current = chosen();
document.documentElement.lang = current;

export function lang() { return current; }

export function setLang(/** @type {string} */ code) {
  current = code in STRINGS ? code : "en";
  localStorage.setItem("telemed.lang", current);
  document.documentElement.lang = current;
}

/** Optional codes (an error the client has no sentence for) fall back quietly. */
const OPTIONAL = /^code\./;

/**
 * The string `key` in the current language, with `{name}` filled from `vars`.
 * @param {string} key @param {Record<string, string | number>} [vars]
 */
export function t(key, vars = {}) {
  let text = STRINGS[current][key];
  if (text === undefined) {
    const [family, ...rest] = key.split(".");
    const name = rest.join(".");
    if (family === "role") text = /** @type {any} */ (ROLES)[current === "en" ? "en" : "zh"][name];
    else text = /** @type {any} */ (FAMILIES)[current][family]?.[name];
  }
  if (text === undefined) {
    if (!OPTIONAL.test(key)) console.warn(`missing string: ${key} (${current})`);
    return key;
  }
  return text.replace(/\{(\w+)\}/g, (_, k) => String(vars[k] ?? ""));
}

/** Elements written in the HTML carry `data-i18n` with their key. */
export function applyStatic(/** @type {Document | HTMLElement} */ root) {
  root.querySelectorAll("[data-i18n]").forEach((el) => { el.textContent = t(/** @type {string} */ (el.getAttribute("data-i18n"))); });
}
