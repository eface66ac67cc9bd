#!/usr/bin/env python3
"""Writes policies/tests/*.json, the decision vectors for the default policies.

The vectors are committed; this script documents how they were made and regenerates them
after a deliberate policy change (review the diff!)."""
import json, os

ROOT = os.path.join(os.path.dirname(__file__), "..", "policies", "tests")
WS = "/home/alice/ws"
STATE = "/srv/chitin"

ENTITIES = [
    {"uid": {"type": "Chitin::Group", "id": "owners"}, "attrs": {}, "parents": []},
    {"uid": {"type": "Chitin::Group", "id": "staff"}, "attrs": {}, "parents": []},
    {"uid": {"type": "Chitin::User", "id": "alice"}, "attrs": {}, "parents": [{"type": "Chitin::Group", "id": "owners"}]},
    {"uid": {"type": "Chitin::User", "id": "mallory"}, "attrs": {}, "parents": [{"type": "Chitin::Group", "id": "staff"}]},
    {"uid": {"type": "Chitin::Identity", "id": "telegram:1"}, "attrs": {"channel": "telegram"}, "parents": [{"type": "Chitin::User", "id": "alice"}]},
    {"uid": {"type": "Chitin::Identity", "id": "telegram:666"}, "attrs": {"channel": "telegram"}, "parents": []},
    {"uid": {"type": "Chitin::Identity", "id": "slack:U2"}, "attrs": {"channel": "slack"}, "parents": [{"type": "Chitin::User", "id": "mallory"}]},
    {"uid": {"type": "Chitin::Conversation", "id": "telegram:dm:1"}, "attrs": {"channel": "telegram", "kind": "dm"}, "parents": []},
    {"uid": {"type": "Chitin::Conversation", "id": "telegram:group:9"}, "attrs": {"channel": "telegram", "kind": "group"}, "parents": []},
]

def user(u): return f'Chitin::User::"{u}"'
def act(a): return f'Chitin::Action::"{a}"'
def tool(t): return f'Chitin::Tool::"{t}"'

def base(approved=False, tainted=False):
    return {"origin": "model", "session": "telegram:dm:1", "approved": approved, "tainted": tainted, "workspace": WS}

def model_ctx(spend, budget, tainted=False):
    return {"session": "cli:alice", "model": "local/llama3.1", "tainted": tainted,
            "spend_today_usd": {"__extn": {"fn": "decimal", "arg": spend}},
            "daily_budget_usd": {"__extn": {"fn": "decimal", "arg": budget}}}

def exec_ctx(argv, cwd=WS, network=False, approved=False, command=None):
    c = base(approved)
    c.update({"command": command or argv[0], "argv": argv, "cwd": cwd, "network": network})
    return c

def file_ctx(path, approved=False):
    c = base(approved); c["path"] = path; return c

def case(name, principal, action, resource, context, decision, policies):
    return {"name": name, "request": {"principal": principal, "action": act(action), "resource": resource, "context": context},
            "decision": decision, "policies": policies}

def write(name, description, cases):
    doc = {"description": description, "state_dir": STATE, "entities": ENTITIES, "cases": cases}
    with open(os.path.join(ROOT, name), "w") as f:
        json.dump(doc, f, indent=2); f.write("\n")

os.makedirs(ROOT, exist_ok=True)

write("admission.json", "Who may talk to the agent (message.receive).", [
    case("an owner's paired identity in a DM is admitted", 'Chitin::Identity::"telegram:1"', "message.receive",
         'Chitin::Conversation::"telegram:dm:1"', {"mentioned": False, "paired": True}, "allow", ["admission.owners"]),
    case("an owner in a group is admitted when mentioned", 'Chitin::Identity::"telegram:1"', "message.receive",
         'Chitin::Conversation::"telegram:group:9"', {"mentioned": True, "paired": True}, "allow", ["admission.owners"]),
    case("an owner in a group is ignored when not mentioned", 'Chitin::Identity::"telegram:1"', "message.receive",
         'Chitin::Conversation::"telegram:group:9"', {"mentioned": False, "paired": True}, "deny", ["admission.groups-need-mention"]),
    case("an unpaired identity gets nothing", 'Chitin::Identity::"telegram:666"', "message.receive",
         'Chitin::Conversation::"telegram:dm:1"', {"mentioned": True, "paired": False}, "deny", ["admission.unpaired-get-nothing"]),
    case("an identity claiming an owner but not paired gets nothing", 'Chitin::Identity::"telegram:1"', "message.receive",
         'Chitin::Conversation::"telegram:dm:1"', {"mentioned": True, "paired": False}, "deny", ["admission.unpaired-get-nothing"]),
    case("a paired non-owner is not admitted by default", 'Chitin::Identity::"slack:U2"', "message.receive",
         'Chitin::Conversation::"telegram:dm:1"', {"mentioned": True, "paired": True}, "deny", []),
])

write("tools.json", "What the agent may do for an owner, and what needs approval.", [
    case("an owner reads a file in the workspace", user("alice"), "read_file", tool("read_file"),
         file_ctx(WS + "/notes.md"), "allow", ["tools.owner-files-in-workspace"]),
    case("an owner lists the workspace itself", user("alice"), "list_dir", tool("list_dir"),
         file_ctx(WS), "allow", ["tools.owner-files-in-workspace"]),
    case("an owner writes a file in the workspace", user("alice"), "write_file", tool("write_file"),
         file_ctx(WS + "/out/report.txt"), "allow", ["tools.owner-files-in-workspace"]),
    case("an owner edits a file in the workspace", user("alice"), "edit_file", tool("edit_file"),
         file_ctx(WS + "/src/main.rs"), "allow", ["tools.owner-files-in-workspace"]),
    case("reading outside the workspace is denied", user("alice"), "read_file", tool("read_file"),
         file_ctx("/etc/passwd"), "deny", []),
    case("a dot-dot path that leaves the workspace is judged by where it lands", user("alice"), "read_file", tool("read_file"),
         file_ctx(WS + "/../.ssh/id_ed25519"), "deny", []),
    case("a sibling directory with the workspace as name prefix is outside", user("alice"), "read_file", tool("read_file"),
         file_ctx(WS + "-evil/x"), "deny", []),
    case("a non-owner may not read even inside the workspace", user("mallory"), "read_file", tool("read_file"),
         file_ctx(WS + "/notes.md"), "deny", []),
    case("an owner runs an offline command in the workspace", user("alice"), "exec", tool("exec"),
         exec_ctx(["ls", "-la"]), "allow", ["tools.owner-exec-offline-in-workspace"]),
    case("a command with network needs approval", user("alice"), "exec", tool("exec"),
         exec_ctx(["curl", "https://example.com"], network=True), "approval_required", ["tools.owner-exec-network-approved"]),
    case("an approved command with network runs", user("alice"), "exec", tool("exec"),
         exec_ctx(["curl", "https://example.com"], network=True, approved=True), "allow", ["tools.owner-exec-network-approved"]),
    case("a command from outside the workspace is denied", user("alice"), "exec", tool("exec"),
         exec_ctx(["ls"], cwd="/etc"), "deny", []),
    case("a non-owner may not run commands", user("mallory"), "exec", tool("exec"),
         exec_ctx(["ls"]), "deny", []),
    case("an owner fetches a public page with GET", user("alice"), "web_fetch", tool("web_fetch"),
         dict(base(), host="example.com", url="https://example.com/", method="GET", private_address=False), "allow", ["tools.owner-fetch-read-only"]),
    case("a POST needs approval", user("alice"), "web_fetch", tool("web_fetch"),
         dict(base(), host="example.com", url="https://example.com/form", method="POST", private_address=False),
         "approval_required", ["tools.owner-fetch-other-methods-approved"]),
    case("a reply in the same conversation is allowed", user("alice"), "send_message", tool("send_message"),
         dict(base(), channel="telegram", target="telegram:dm:1", same_conversation=True), "allow", ["tools.owner-reply-same-conversation"]),
    case("a message to another conversation from an untainted session goes out", user("alice"), "send_message", tool("send_message"),
         dict(base(), channel="telegram", target="telegram:dm:42", same_conversation=False), "allow", ["tools.owner-message-elsewhere-untainted"]),
    case("after taint a message to another conversation needs approval", user("alice"), "send_message", tool("send_message"),
         dict(base(tainted=True), channel="telegram", target="telegram:dm:42", same_conversation=False), "approval_required", ["tools.owner-message-elsewhere-approved"]),
    case("after taint an approved message to another conversation goes out", user("alice"), "send_message", tool("send_message"),
         dict(base(approved=True, tainted=True), channel="telegram", target="telegram:dm:42", same_conversation=False), "allow", ["tools.owner-message-elsewhere-approved"]),
    case("after taint a reply in the same conversation is still allowed", user("alice"), "send_message", tool("send_message"),
         dict(base(tainted=True), channel="telegram", target="telegram:dm:1", same_conversation=True), "allow", ["tools.owner-reply-same-conversation"]),
    case("an owner may grant approvals", user("alice"), "approval.grant", tool("exec"),
         {"requester": {"__entity": {"type": "Chitin::User", "id": "alice"}}}, "allow", ["tools.approvals-by-owners"]),
    case("a non-owner may not grant approvals", user("mallory"), "approval.grant", tool("exec"),
         {"requester": {"__entity": {"type": "Chitin::User", "id": "alice"}}}, "deny", []),
    case("the requester may be given as a plain user id", user("alice"), "approval.grant", tool("exec"),
         {"requester": "alice"}, "allow", ["tools.approvals-by-owners"]),
    case("the requester may be given as an entity reference", user("alice"), "approval.grant", tool("exec"),
         {"requester": 'Chitin::User::"alice"'}, "allow", ["tools.approvals-by-owners"]),
    case("secrets are never released by default", 'Chitin::Tool::"exec"', "secret.use", 'Chitin::Secret::"openai"',
         {"host": "api.openai.com"}, "deny", []),
    case("skills are never installed by default", user("alice"), "skill.install", 'Chitin::Skill::"weather"',
         {}, "deny", []),
])

write("agent.json", "Model calls by the agent loop, and the daily budget.", [
    case("an owner's model call within budget is allowed", user("alice"), "model.call", 'Chitin::Agent::"main"',
         model_ctx("0.5000", "2.0000"), "allow", ["agent.owner-model-calls"]),
    case("an owner with no budget limit is allowed whatever the spend", user("alice"), "model.call", 'Chitin::Agent::"main"',
         model_ctx("1000.0000", "0.0000"), "allow", ["agent.owner-model-calls"]),
    case("an owner who spent the daily budget is denied", user("alice"), "model.call", 'Chitin::Agent::"main"',
         model_ctx("2.0000", "2.0000"), "deny", ["budget.deny-over-daily-budget"]),
    case("an owner over the daily budget is denied", user("alice"), "model.call", 'Chitin::Agent::"main"',
         model_ctx("2.5000", "2.0000"), "deny", ["budget.deny-over-daily-budget"]),
    case("a non-owner gets no model calls by default", user("mallory"), "model.call", 'Chitin::Agent::"main"',
         model_ctx("0.0000", "0.0000"), "deny", []),
])

write("guardrails.json", "Forbids that no permit or approval can override.", [
    case("reading the state directory is forbidden even for owners", user("alice"), "read_file", tool("read_file"),
         file_ctx(STATE + "/secrets.age"), "deny", ["guard.state-dir-off-limits"]),
    case("the state directory stays forbidden with approval", user("alice"), "write_file", tool("write_file"),
         file_ctx(STATE + "/chitin.toml", approved=True), "deny", ["guard.state-dir-off-limits"]),
    case("a workspace inside the state dir does not open the state dir", user("alice"), "read_file", tool("read_file"),
         dict(file_ctx(STATE + "/audit.db"), workspace=STATE + "/workspace"), "deny", ["guard.state-dir-off-limits"]),
    case("a command run from the state directory is forbidden", user("alice"), "exec", tool("exec"),
         exec_ctx(["ls"], cwd=STATE), "deny", ["guard.state-dir-off-limits"]),
    case("a command naming a state file in its arguments is forbidden", user("alice"), "exec", tool("exec"),
         exec_ctx(["cat", STATE + "/secrets.age"]), "deny", ["guard.state-dir-off-limits"]),
    case("a relative argument that climbs into the state dir is forbidden", user("alice"), "exec", tool("exec"),
         dict(exec_ctx(["cat", "../chitin/audit.key"], cwd="/srv/ws"), workspace="/srv/ws"), "deny", ["guard.state-dir-off-limits"]),
    case("an option that embeds a state path is forbidden", user("alice"), "exec", tool("exec"),
         exec_ctx(["tar", "--file=" + STATE + "/state.db", "-c"]), "deny", ["guard.state-dir-off-limits"]),
    case("fetching a private address is forbidden", user("alice"), "web_fetch", tool("web_fetch"),
         dict(base(), host="127.0.0.1", url="http://127.0.0.1:18789/tools/invoke", method="GET", private_address=True), "deny", ["guard.no-private-fetch"]),
    case("fetching a private address stays forbidden with approval", user("alice"), "web_fetch", tool("web_fetch"),
         dict(base(approved=True), host="169.254.169.254", url="http://169.254.169.254/latest/meta-data/", method="GET", private_address=True), "deny", ["guard.no-private-fetch"]),
    case("a write outside the workspace is not permitted by default", user("alice"), "write_file", tool("write_file"),
         file_ctx("/etc/cron.d/evil"), "deny", ["guard.writes-outside-workspace-need-approval"]),
    case("an approved write outside the workspace is still not permitted by default", user("alice"), "write_file", tool("write_file"),
         file_ctx("/etc/cron.d/evil", approved=True), "deny", []),
    case("caller-supplied derived attributes are ignored", user("alice"), "read_file", tool("read_file"),
         dict(file_ctx("/etc/shadow"), in_workspace=True, touches_state_dir=False), "deny", []),
])

write("admin.json", "Administration of the gateway.", [
    *[case(f"an owner may {a}", user("alice"), a, 'Chitin::Gateway::"gateway"', {}, "allow", ["admin.owners"])
      for a in ["policy.reload", "audit.read", "audit.export", "data.export", "data.erase", "pairing.approve", "config.write"]],
    *[case(f"a non-owner may not {a}", user("mallory"), a, 'Chitin::Gateway::"gateway"', {}, "deny", [])
      for a in ["policy.reload", "audit.export", "data.erase", "config.write"]],
])

def secret(n): return f'Chitin::Secret::"{n}"'
def provider(p): return f'Chitin::Provider::"{p}"'

SECRET_ENTITIES = [
    {"uid": {"type": "Chitin::Secret", "id": "openai_key"}, "attrs": {"audience": ["api.openai.com"]}, "parents": []},
    {"uid": {"type": "Chitin::Secret", "id": "anthropic_key"}, "attrs": {"audience": ["api.anthropic.com"]}, "parents": []},
    {"uid": {"type": "Chitin::Secret", "id": "github_token"}, "attrs": {"audience": ["api.github.com", "github.com"]}, "parents": []},
    {"uid": {"type": "Chitin::Secret", "id": "no_audience"}, "attrs": {"audience": []}, "parents": []},
]

def write_secrets():
    doc = {"description": "Secret release (secret.use): providers get a key only for a host in its audience; tools get nothing by default.",
           "state_dir": STATE, "entities": ENTITIES + SECRET_ENTITIES, "cases": [
        case("a provider uses its key for a host in the key's audience", provider("openai"), "secret.use", secret("openai_key"),
             {"host": "api.openai.com"}, "allow", ["secrets.providers-use-keys-for-their-audience"]),
        case("any host of a multi-host audience is allowed", provider("gh"), "secret.use", secret("github_token"),
             {"host": "github.com"}, "allow", ["secrets.providers-use-keys-for-their-audience"]),
        case("a provider is refused a key for a foreign host", provider("openai"), "secret.use", secret("openai_key"),
             {"host": "evil.example"}, "deny", []),
        case("a host that only contains the audience host is foreign", provider("openai"), "secret.use", secret("openai_key"),
             {"host": "api.openai.com.evil.example"}, "deny", []),
        case("a subdomain of the audience host is foreign (no wildcards)", provider("openai"), "secret.use", secret("openai_key"),
             {"host": "x.api.openai.com"}, "deny", []),
        case("a key goes to its own audience, not to another provider's host", provider("openai"), "secret.use", secret("anthropic_key"),
             {"host": "api.openai.com"}, "deny", []),
        case("a secret with an empty audience is never sent anywhere", provider("openai"), "secret.use", secret("no_audience"),
             {"host": "api.openai.com"}, "deny", []),
        case("a secret that is not in the store (no entity) is refused", provider("openai"), "secret.use", secret("missing"),
             {"host": "api.openai.com"}, "deny", []),
        case("a tool gets no secret in its environment by default", tool("exec"), "secret.use", secret("github_token"),
             {"host": "env:exec"}, "deny", []),
        case("a tool naming an audience host as context still gets nothing", tool("exec"), "secret.use", secret("github_token"),
             {"host": "api.github.com"}, "deny", []),
        case("a tool running a named program gets nothing by default either", tool("exec"), "secret.use", secret("github_token"),
             {"host": "env:exec", "command": "git"}, "deny", []),
    ]}
    with open(os.path.join(ROOT, "secrets.json"), "w") as f:
        json.dump(doc, f, indent=2); f.write("\n")

write_secrets()
