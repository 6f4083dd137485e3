"""Formatting `p2psync status` for people."""

from __future__ import annotations


def format_status(st: dict) -> str:
    """The status reply as a few aligned lines."""
    d = st["device"]
    m = st.get("membership") or {}
    lines = [f"device   {d['name']} (site {d['site'][:12]}), group {st['group'][:12]}",
             f"group    {m.get('members', '?')} members, {m.get('admins', '?')} admins; this device: "
             f"{m.get('role') or '?'}"
             + (f"; {m['pending_invites']} pending invites" if m.get("pending_invites") else ""),
             f"database {d['db']}",
             f"listen   {st.get('listen') or '-'}",
             f"tracked  {', '.join(st.get('tracked') or []) or '(none: run `p2psync track TABLE`)'}"]
    if st.get("incarnation"):
        lines.append(f"notice   {st['incarnation']}")
    if m.get("removed"):
        lines.append(f"REMOVED  {m['removed']}")
    for n in m.get("notices", []):
        lines.append(f"notice   {n}")
    if m.get("ignored_events"):
        lines.append(f"notice   {m['ignored_events']} membership events do not count (not signed by an admin "
                     f"at that point, or badly signed); `p2psync devices` shows what does")
    held = st.get("held", {})
    if held.get("count"):
        reasons = ", ".join(f"{k}: {v}" for k, v in held["reasons"].items())
        lines.append(f"held     {held['count']} changes ({reasons}); `p2psync release` applies skewed ones now")
    else:
        lines.append("held     0 changes")
    for advice in held.get("paused", []):
        lines.append(f"PAUSED   {advice}")
    auth = st.get("authenticity") or {}
    if auth and not auth.get("signing"):
        lines.append("UNSIGNED this device does not hold its group's founding key yet, so its writes are not "
                     "signed and no peer accepts them; it gets the key when it next meets an admin's agent")
    if auth.get("changes_refused") or auth.get("ranges_cut"):
        lines.append(f"refused  {auth.get('changes_refused', 0)} changes and {auth.get('ranges_cut', 0)} version "
                     f"ranges from peers were not signed by their origin and were not applied (see the log: "
                     f"a tampered relay database or a hostile member)")
    for c in auth.get("conflicts", []):
        lines.append(f"CLONE?   {c}")
    cap = st.get("capture") or {}
    for p in cap.get("problems", []):
        lines.append(f"STOPPED  {p['message']}")
    for table, cols in (cap.get("untracked_columns") or {}).items():
        lines.append(f"notice   columns {', '.join(map(repr, cols))} of table {table!r} are not synced "
                     f"(track_new_columns is off); `p2psync track {table}` syncs them")
    for f in (cap.get("found") or [])[-3:]:
        lines.append(f"found    {f['sentence']}")
    peers = st.get("peers", [])
    differ = [p["address"] for p in peers if p.get("schema_differs")]
    if differ:
        lines.append(f"schema   {', '.join(differ)} track{'s' if len(differ) == 1 else ''} other tables or columns "
                     f"than this device: cells of columns missing here are held until this device has them")
    lines.append(f"peers    {sum(p['state'] == 'connected' for p in peers)} connected")
    for p in peers:
        name = ("relay " if p.get("relay") else "") + p["address"]
        if p.get("rejected_changes"):
            lines.append(f"  {name}: {p['rejected_changes']} changes failed authentication and were not applied "
                         f"({p.get('last_rejection')}); the relay or its database was tampered with")
        if p["state"] == "connected":
            lines.append(f"  {name:<22} connected {p['connected_for_s']:>7.1f}s  last seen "
                         f"{p['last_seen_s_ago']:.1f}s ago  we owe {p['we_owe']}  they owe {p['they_owe']}")
        else:
            lines.append(f"  {name:<22} {p['state']}  ({p.get('last_error') or 'no error'})")
    return "\n".join(lines)
