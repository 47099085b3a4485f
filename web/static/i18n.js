/* LPMOS console strings: English and Simplified Chinese.
 * The page's <html data-lang> is chosen by the server (lang cookie, else
 * Accept-Language); the switch sets the cookie and reloads.
 * Only textContent is ever written. */
"use strict";
(function () {
  const STRINGS = {
    en: {
      "login.subtitle": "Bare-metal provisioning console",
      "login.user": "User name", "login.password": "Password", "login.submit": "Log in",
      "login.error.unauthorized": "Wrong user name or password.",
      "login.error.rate_limited": "Too many attempts. Wait a minute and try again.",
      "login.error.csrf": "The form expired. Please try again.",
      "login.error.unavailable": "The database is not reachable. Try again shortly.",
      "login.error.no_role": "You are in no directory group that grants an LPMOS role. Ask an administrator.",
      "login.error.directory_unavailable": "The directory (LDAP) is not reachable. Try again shortly.",
      "nav.tasks": "Tasks", "nav.servers": "Servers", "nav.stats": "Stats",
      "nav.batch": "Batch import", "nav.templates": "Templates", "nav.audit": "Audit log",
      "nav.logout": "Log out",
      "live.connecting": "connecting", "live.live": "live", "live.offline": "offline — reconnecting",
      "common.close": "Close", "common.cancel": "Cancel", "common.save": "Save",
      "common.more": "Load more", "common.none": "Nothing here yet.", "common.search": "Search",
      "common.all": "All", "common.refresh": "Refresh", "common.delete": "Delete",
      "common.details": "Details", "common.yes": "yes", "common.no": "no",
      "common.loading": "Loading…",
      "idc.nodes": "node(s) alive", "idc.none": "No IDC has reported yet.",
      "tasks.new": "New task", "tasks.filter.idc": "IDC", "tasks.filter.status": "Status",
      "tasks.filter.q": "SN, MAC, OS, user…", "tasks.count": "{n} tasks",
      "col.idc": "IDC", "col.sn": "Serial number", "col.mac": "MAC", "col.os": "OS",
      "col.status": "Status", "col.progress": "Progress", "col.updated": "Updated",
      "col.actions": "Actions", "col.created_by": "Created by", "col.vendor": "Vendor / product",
      "col.cpu": "CPU", "col.memory": "Memory", "col.disks": "Disks", "col.online": "Agent",
      "col.task": "Task", "col.last_seen": "Last seen", "col.time": "Time",
      "col.actor": "Who", "col.action": "Action", "col.target": "Target",
      "col.detail": "Notes", "col.name": "Name", "col.description": "Description",
      "col.image": "Image", "col.row": "Row", "col.field": "Field", "col.error": "Error",
      "col.stage": "Stage", "col.version": "Version",
      "status.pending": "pending", "status.approved": "approved", "status.booting": "booting",
      "status.installing": "installing", "status.succeeded": "succeeded",
      "status.failed": "failed", "status.rejected": "rejected", "status.cancelled": "cancelled",
      "act.approve": "Approve", "act.reject": "Reject", "act.cancel": "Cancel task",
      "act.retry": "Retry", "act.delete": "Delete", "act.create_task": "Create task",
      "act.clear_conflict": "Clear conflict", "conflict.title": "Clear the conflict flag of {t}",
      "conflict.warn": "Installs are refused while a machine is flagged (a MAC seen with another UUID: a cloned VM?). Clear it only after checking; say what you checked.",
      "done.clear_conflict": "Conflict flag of {t} cleared",
      "act.timeline": "Boot timeline",
      "form.idc": "IDC", "form.sn": "Serial number", "form.mac": "Boot MAC",
      "form.os": "Operating system", "form.os_version": "OS version", "form.template": "Template",
      "form.notes": "Notes", "form.none": "— none —", "form.create": "Create task",
      "form.created": "Task created for {t}.", "form.image": "Image",
      "form.description": "Description", "form.params": "Parameters (JSON)",
      "form.name": "Name",
      "form.hostname": "Host name", "form.password_hash": "Password hash (default user)",
      "form.ssh_keys": "SSH authorized keys (one per line)", "form.ssh_keys_hint": "ssh-ed25519 AAAA… you@host",
      "form.cloud_config": "Cloud-config (merged with LPMOS's; checked by cloud-init)",
      "form.network": "Network (JSON; empty: DHCP on the boot NIC)",
      "approve.title": "Approve install of {t}?",
      "approve.warn": "Approving lets the machine boot the installer and WIPE its target disk.",
      "reject.title": "Reject the task for {t}?", "cancel.title": "Cancel the task for {t}?",
      "retry.title": "Retry the install of {t}?", "delete.title": "Delete the task for {t}?",
      "approve.notes": "Notes for the audit log (optional)", "act.confirm": "Confirm",
      "done.approve": "Approved {t}.", "done.reject": "Rejected {t}.",
      "done.cancel": "Cancelled {t}.", "done.retry": "Retrying {t}.", "done.delete": "Deleted {t}.",
      "detail.history": "History", "detail.log": "Log", "detail.fields": "Task",
      "log.full.show": "Full log", "log.full.hide": "Hide full log",
      "log.full.meta": "Attempt {attempt} of {attempts}, kept by node {node}: {n} lines",
      "log.full.dropped": "{n} older lines were dropped by the node's size limit.",
      "detail.inventory": "Hardware inventory", "detail.system": "System",
      "detail.firmware": "Firmware", "detail.nics": "Network interfaces",
      "detail.unavailable": "Not collected", "detail.timeline": "Boot timeline",
      "detail.no_timeline": "No boot events recorded yet.", "detail.bmc": "BMC",
      "servers.filter.q": "SN, MAC, vendor, IP…", "servers.online": "online",
      "servers.offline": "offline", "servers.conflict": "conflict",
      "stats.total": "Tasks", "stats.median": "Median install time",
      "stats.per_hour": "Installs per hour (last 24 h)", "stats.per_idc": "Tasks per IDC",
      "stats.per_state": "Tasks per state", "stats.servers": "Servers (agents online)",
      "stats.succeeded": "succeeded", "stats.failed": "failed",
      "batch.title": "Import many tasks at once", "batch.help":
        "Paste a JSON list of tasks or CSV with a header row (idc,sn,mac,os_type,os_version,image,template,notes), or choose a file. All rows are created, or none.",
      "batch.file": "File (JSON or CSV)", "batch.submit": "Import",
      "batch.created": "{n} tasks created.", "batch.refused": "Nothing was created: fix these rows.",
      "templates.title": "Task templates", "templates.new": "New template",
      "templates.saved": "Template {t} saved.",
      "audit.filter.actor": "user", "audit.filter.action": "action (e.g. task.)",
      "audit.filter.target": "target",
      "nav.webhooks": "Webhooks", "webhooks.title": "Webhooks",
      "webhooks.help": "LPMOS POSTs signed JSON (X-LPMOS-Signature: HMAC-SHA256 of the body with the webhook's secret) when a task changes state or a node's liveness changes; failed deliveries are retried with back-off until a deadline.",
      "webhooks.url": "URL", "webhooks.events": "Events", "webhooks.enabled": "Enabled",
      "webhooks.log": "Deliveries", "webhooks.enable": "Enable", "webhooks.disable": "Disable",
      "webhooks.new": "New webhook", "webhooks.create": "Create",
      "webhooks.secret_once": "The webhook's secret, shown only now: give it to the receiver to check signatures.",
      "webhooks.deliveries": "Deliveries to {url} (newest first, this control plane's attempts)",
      "webhooks.no_deliveries": "No delivery attempted yet.",
      "webhooks.event": "Event", "webhooks.delivery": "Delivery", "webhooks.attempt": "Attempt",
      "webhooks.duration": "Time", "webhooks.outcome": "Outcome",
      "webhooks.outcome.delivered": "delivered", "webhooks.outcome.retrying": "will retry",
      "webhooks.outcome.gave_up": "gave up (deadline)", "webhooks.outcome.refused": "refused by receiver",
      "err.generic": "Request failed", "err.forbidden": "Your role does not allow this.",
      "err.conflict": "Someone else changed this first. The list shows the current state.",
      "err.network": "The control plane is not reachable."
    },
    zh: {
      "login.subtitle": "裸金属装机控制台",
      "login.user": "用户名", "login.password": "密码", "login.submit": "登录",
      "login.error.unauthorized": "用户名或密码错误。",
      "login.error.rate_limited": "尝试次数过多，请稍后再试。",
      "login.error.csrf": "表单已过期，请重试。",
      "login.error.unavailable": "数据库暂时不可用，请稍后再试。",
      "login.error.no_role": "您不在任何授予 LPMOS 角色的目录组中，请联系管理员。",
      "login.error.directory_unavailable": "目录服务（LDAP）暂时不可用，请稍后再试。",
      "nav.tasks": "装机任务", "nav.servers": "服务器", "nav.stats": "统计",
      "nav.batch": "批量导入", "nav.templates": "任务模板", "nav.audit": "审计日志",
      "nav.logout": "退出登录",
      "live.connecting": "连接中", "live.live": "实时", "live.offline": "已断开，正在重连",
      "common.close": "关闭", "common.cancel": "取消", "common.save": "保存",
      "common.more": "加载更多", "common.none": "暂无数据。", "common.search": "搜索",
      "common.all": "全部", "common.refresh": "刷新", "common.delete": "删除",
      "common.details": "详情", "common.yes": "是", "common.no": "否",
      "common.loading": "加载中…",
      "idc.nodes": "个节点在线", "idc.none": "尚无机房上报。",
      "tasks.new": "新建任务", "tasks.filter.idc": "机房", "tasks.filter.status": "状态",
      "tasks.filter.q": "序列号、MAC、系统、用户…", "tasks.count": "共 {n} 个任务",
      "col.idc": "机房", "col.sn": "序列号", "col.mac": "MAC", "col.os": "操作系统",
      "col.status": "状态", "col.progress": "进度", "col.updated": "更新时间",
      "col.actions": "操作", "col.created_by": "创建人", "col.vendor": "厂商 / 型号",
      "col.cpu": "CPU", "col.memory": "内存", "col.disks": "磁盘", "col.online": "Agent",
      "col.task": "任务", "col.last_seen": "最后上报", "col.time": "时间",
      "col.actor": "操作人", "col.action": "动作", "col.target": "对象",
      "col.detail": "备注", "col.name": "名称", "col.description": "描述",
      "col.image": "镜像", "col.row": "行", "col.field": "字段", "col.error": "错误",
      "col.stage": "阶段", "col.version": "版本",
      "status.pending": "待审批", "status.approved": "已批准", "status.booting": "启动中",
      "status.installing": "安装中", "status.succeeded": "成功",
      "status.failed": "失败", "status.rejected": "已驳回", "status.cancelled": "已取消",
      "act.approve": "批准", "act.reject": "驳回", "act.cancel": "取消任务",
      "act.retry": "重试", "act.delete": "删除", "act.create_task": "创建任务",
      "act.clear_conflict": "清除冲突", "conflict.title": "清除 {t} 的冲突标记",
      "conflict.warn": "机器被标记冲突时（同一 MAC 出现不同 UUID：可能是克隆的虚拟机）不会下发安装。请确认后再清除，并写明检查内容。",
      "done.clear_conflict": "已清除 {t} 的冲突标记",
      "act.timeline": "启动时间线",
      "form.idc": "机房", "form.sn": "序列号", "form.mac": "启动网卡 MAC",
      "form.os": "操作系统", "form.os_version": "系统版本", "form.template": "模板",
      "form.notes": "备注", "form.none": "— 无 —", "form.create": "创建任务",
      "form.created": "已为 {t} 创建任务。", "form.image": "镜像",
      "form.description": "描述", "form.params": "参数（JSON）", "form.name": "名称",
      "form.hostname": "主机名", "form.password_hash": "密码哈希（默认用户）",
      "form.ssh_keys": "SSH 授权公钥（每行一个）", "form.ssh_keys_hint": "ssh-ed25519 AAAA… you@host",
      "form.cloud_config": "cloud-config（与 LPMOS 的合并，由 cloud-init 校验）",
      "form.network": "网络（JSON；留空：启动网卡 DHCP）",
      "approve.title": "批准 {t} 的装机？",
      "approve.warn": "批准后该机器将启动安装程序并清空目标磁盘。",
      "reject.title": "驳回 {t} 的任务？", "cancel.title": "取消 {t} 的任务？",
      "retry.title": "重新安装 {t}？", "delete.title": "删除 {t} 的任务？",
      "approve.notes": "审计备注（可选）", "act.confirm": "确认",
      "done.approve": "已批准 {t}。", "done.reject": "已驳回 {t}。",
      "done.cancel": "已取消 {t}。", "done.retry": "已重试 {t}。", "done.delete": "已删除 {t}。",
      "detail.history": "状态历史", "detail.log": "日志", "detail.fields": "任务",
      "log.full.show": "完整日志", "log.full.hide": "收起完整日志",
      "log.full.meta": "第 {attempt} 次尝试（共 {attempts} 次），由节点 {node} 保存：{n} 行",
      "log.full.dropped": "节点的大小上限已丢弃更早的 {n} 行。",
      "detail.inventory": "硬件信息", "detail.system": "系统",
      "detail.firmware": "固件", "detail.nics": "网卡",
      "detail.unavailable": "未采集", "detail.timeline": "启动时间线",
      "detail.no_timeline": "尚无启动记录。", "detail.bmc": "BMC",
      "servers.filter.q": "序列号、MAC、厂商、IP…", "servers.online": "在线",
      "servers.offline": "离线", "servers.conflict": "冲突",
      "stats.total": "任务总数", "stats.median": "安装耗时中位数",
      "stats.per_hour": "每小时装机数（最近 24 小时）", "stats.per_idc": "各机房任务",
      "stats.per_state": "各状态任务", "stats.servers": "服务器（Agent 在线）",
      "stats.succeeded": "成功", "stats.failed": "失败",
      "batch.title": "批量导入任务", "batch.help":
        "粘贴 JSON 任务列表，或带表头的 CSV（idc,sn,mac,os_type,os_version,image,template,notes），也可选择文件。要么全部创建，要么全部不创建。",
      "batch.file": "文件（JSON 或 CSV）", "batch.submit": "导入",
      "batch.created": "已创建 {n} 个任务。", "batch.refused": "未创建任何任务：请修正以下行。",
      "templates.title": "任务模板", "templates.new": "新建模板",
      "templates.saved": "模板 {t} 已保存。",
      "audit.filter.actor": "用户", "audit.filter.action": "动作（如 task.）",
      "audit.filter.target": "对象",
      "nav.webhooks": "Webhook", "webhooks.title": "Webhook 通知",
      "webhooks.help": "任务状态或节点存活状态变化时，LPMOS 以 POST 发送签名的 JSON（X-LPMOS-Signature：以 Webhook 密钥对正文做 HMAC-SHA256）；投递失败会按退避重试，直到截止时间。",
      "webhooks.url": "URL", "webhooks.events": "事件", "webhooks.enabled": "启用",
      "webhooks.log": "投递记录", "webhooks.enable": "启用", "webhooks.disable": "停用",
      "webhooks.new": "新建 Webhook", "webhooks.create": "创建",
      "webhooks.secret_once": "Webhook 密钥仅此一次显示：请交给接收方用于校验签名。",
      "webhooks.deliveries": "投递到 {url} 的记录（最新在前，本控制台实例的尝试）",
      "webhooks.no_deliveries": "尚无投递。",
      "webhooks.event": "事件", "webhooks.delivery": "投递 ID", "webhooks.attempt": "次数",
      "webhooks.duration": "耗时", "webhooks.outcome": "结果",
      "webhooks.outcome.delivered": "已送达", "webhooks.outcome.retrying": "将重试",
      "webhooks.outcome.gave_up": "已放弃（超时）", "webhooks.outcome.refused": "接收方拒绝",
      "err.generic": "请求失败", "err.forbidden": "您的角色无权执行此操作。",
      "err.conflict": "已被他人先行修改，列表显示的是最新状态。",
      "err.network": "无法连接控制台服务。"
    }
  };
  const lang = (document.documentElement.dataset.lang === "zh") ? "zh" : "en";
  function t(key, vars) {
    let s = (STRINGS[lang] && STRINGS[lang][key]) || STRINGS.en[key] || key;
    if (vars) {
      for (const k of Object.keys(vars)) s = s.split("{" + k + "}").join(String(vars[k]));
    }
    return s;
  }
  function apply(root) {
    for (const node of (root || document).querySelectorAll("[data-i18n]")) {
      const key = node.getAttribute("data-i18n");
      const value = t(key);
      if (value !== key) node.textContent = value;
    }
    for (const node of (root || document).querySelectorAll("[data-i18n-placeholder]")) {
      node.setAttribute("placeholder", t(node.getAttribute("data-i18n-placeholder")));
    }
  }
  function setLang(value) {
    document.cookie = "lang=" + (value === "zh" ? "zh" : "en") +
      "; path=/; max-age=31536000; SameSite=Lax";
    location.reload();
  }
  document.addEventListener("click", (ev) => {
    const target = ev.target.closest ? ev.target.closest("[data-set-lang]") : null;
    if (target) { ev.preventDefault(); setLang(target.getAttribute("data-set-lang")); }
  });
  window.LPMOS_I18N = { lang, t, apply, setLang };
})();
