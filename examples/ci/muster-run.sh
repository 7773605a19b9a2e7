#!/bin/sh
# muster-run.sh: triggers a Muster run from a CI job, prints its log live and
# exits with the run's exit code. Needs only a POSIX shell, curl and sed.
#
# Usage: muster-run.sh WORKSPACE BLOCK ACTION [REASON]
#
# Environment:
#   MUSTER_URL         the coordinator, e.g. https://muster.example.org (required)
#   MUSTER_API_KEY     an API key with at least the `user` role (required)
#   MUSTER_EXTRA_VARS  extra variables as a JSON object, e.g.
#                      {"patch_profile": "security-only"} (default {})
#   MUSTER_CANCEL_ON_INTERRUPT=1
#                      on SIGINT or SIGTERM (a CI job being canceled), cancel
#                      the run and follow it until it has ended; without it,
#                      stop following and leave the run running
#
# Progress goes to stderr, the run's log to stdout. Exit codes, as
# `muster run --wait`: 0 succeeded; the run's own exit code when it failed
# (1 without one); 124 timed out; 125 lost; 130 canceled (or interrupted and
# detached); 143 terminated and detached; 2 usage; 65 the API refused the
# request; 69 the coordinator could not be reached or failed; 77 not
# authorized.
#
# How it works (docs/ci.md): POST /api/v1/workspaces/WORKSPACE/actions, then
# GET /api/v1/action-runs/ID/logs/ with `Accept: text/event-stream`: `log`
# events carry the log (their id is the chunk's seq, sent back as
# Last-Event-ID to resume after a broken connection), `status` events the
# progress, and the `end` event the status and exit code.
set -u

me=muster-run
say() { printf '%s: %s\n' "$me" "$*" >&2; }
die() {
    code=$1
    shift
    say "$*"
    exit "$code"
}

[ $# -ge 3 ] && [ $# -le 4 ] || die 2 "usage: muster-run.sh WORKSPACE BLOCK ACTION [REASON]"
[ -n "${MUSTER_URL:-}" ] || die 2 "MUSTER_URL is not set (the coordinator's address)"
[ -n "${MUSTER_API_KEY:-}" ] || die 77 "MUSTER_API_KEY is not set"
command -v curl >/dev/null 2>&1 || die 1 "curl is not installed"

url=${MUSTER_URL%/}
workspace=$1
block=$2
action=$3
reason=${4:-"Triggered by muster-run.sh"}
extra_vars=${MUSTER_EXTRA_VARS:-"{}"}
case ${MUSTER_CANCEL_ON_INTERRUPT:-0} in
1 | [tT]rue | TRUE | [yY] | [yY]es | YES | [oO]n | ON | t) cancel_on_interrupt=1 ;;
0 | [fF]alse | FALSE | [nN] | [nN]o | NO | [oO]ff | OFF | f | '') cancel_on_interrupt=0 ;;
*) die 2 "MUSTER_CANCEL_ON_INTERRUPT: expected 1 or 0 (true/false, yes/no), found '$MUSTER_CANCEL_ON_INTERRUPT'" ;;
esac

# The server reads the CI system from the User-Agent.
agent="muster-run.sh"
if [ -n "${GITLAB_CI:-}" ]; then
    agent="$agent (gitlab-ci)"
elif [ -n "${GITHUB_ACTIONS:-}" ]; then
    agent="$agent (github-actions)"
fi

tmp=$(mktemp -d) || die 1 "cannot create a temporary directory"
trap 'rm -rf "$tmp"' EXIT
# The key goes to curl in a file only we can read, never on its command line.
(
    umask 077
    printf 'Authorization: Bearer %s\n' "$MUSTER_API_KEY" >"$tmp/auth"
)

# curl with what every call needs; the answer's HTTP status goes to $tmp/status.
api() {
    curl -sS -A "$agent" -H @"$tmp/auth" -w '%{http_code}' -o "$tmp/body" "$@" >"$tmp/status"
}

# The exit code for an HTTP status the API answered with instead of success.
refused() {
    case $1 in
    401 | 403) echo 77 ;;
    4??) echo 65 ;;
    *) echo 69 ;;
    esac
}

json_string() {
    printf '%s' "$1" | tr '\n\r\t' '   ' | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g'
}

# An interrupt is acted on once the run's id is known.
interrupted=
trap 'interrupted=130' INT
trap 'interrupted=143' TERM

# --- Trigger -----------------------------------------------------------------

body=$(printf '{"block": "%s", "action": "%s", "reason": "%s", "parameters": {"extra_vars": %s}}' \
    "$(json_string "$block")" "$(json_string "$action")" "$(json_string "$reason")" "$extra_vars")
api -X POST -H 'Content-Type: application/json' --data-binary "$body" \
    "$url/api/v1/workspaces/$workspace/actions" ||
    die 69 "cannot reach the coordinator at $url"
status=$(cat "$tmp/status")
case $status in
2??) ;;
*) die "$(refused "$status")" "the coordinator answered $status: $(cat "$tmp/body")" ;;
esac
id=$(sed -n 's/.*"id": *"\([0-9a-fA-F-]*\)".*/\1/p' "$tmp/body")
[ -n "$id" ] || die 69 "the coordinator answered without a run id: $(cat "$tmp/body")"
say "run $id queued"

# --- Follow ------------------------------------------------------------------

# A log event's text: the JSON string in `"data":"…"` turned into what
# printf %b prints. Escaped backslashes and quotes are set aside first (as
# \001 and \002, which never occur raw in JSON), so no escape is read twice;
# \uXXXX (control characters) becomes an octal escape.
soh=$(printf '\001')
stx=$(printf '\002')
unescape="
s/\\\\\\\\/$soh/g
s/\\\\\"/$stx/g
s/^.*\"data\": *\"//
s/\".*\$//
s/$stx/\"/g
s/\\\\u000\\([0-7]\\)/\\\\000\\1/g
s/\\\\u0008/\\\\0010/g
s/\\\\u0009/\\\\0011/g
s/\\\\u000[aA]/\\\\0012/g
s/\\\\u000[bB]/\\\\0013/g
s/\\\\u000[cC]/\\\\0014/g
s/\\\\u000[dD]/\\\\0015/g
s/\\\\u000[eE]/\\\\0016/g
s/\\\\u000[fF]/\\\\0017/g
s/\\\\u001\\([0-7]\\)/\\\\002\\1/g
s/\\\\u0018/\\\\0030/g
s/\\\\u0019/\\\\0031/g
s/\\\\u001[aA]/\\\\0032/g
s/\\\\u001[bB]/\\\\0033/g
s/\\\\u001[cC]/\\\\0034/g
s/\\\\u001[dD]/\\\\0035/g
s/\\\\u001[eE]/\\\\0036/g
s/\\\\u001[fF]/\\\\0037/g
s/$soh/\\\\\\\\/g
"
cr=$(printf '\r')

field() { # field NAME JSON: a string or number field's value; empty for null
    printf '%s\n' "$2" | sed -n "s/.*\"$1\": *\"\\{0,1\\}\\([^\",}]*\\).*/\\1/p" | sed 's/^null$//'
}

# Reads one connection's events; leaves the last log seq in $tmp/last and,
# once the run has ended, "STATUS EXIT_CODE" in $tmp/end.
read_events() {
    ev=
    data=
    eid=
    while IFS= read -r line; do
        line=${line%"$cr"}
        case $line in
        event:*)
            ev=${line#event:}
            ev=${ev# }
            ;;
        data:*)
            data=${line#data:}
            data=${data# }
            ;;
        id:*)
            eid=${line#id:}
            eid=${eid# }
            ;;
        '')
            case $ev in
            log)
                text=$(printf '%s\n' "$data" | sed "$unescape")
                printf '%b' "$text"
                [ -z "$eid" ] || printf '%s\n' "$eid" >"$tmp/last"
                ;;
            status)
                st=$(field status "$data")
                runner=$(field runner "$data")
                if [ "$st $runner" != "$(cat "$tmp/told" 2>/dev/null)" ]; then
                    printf '%s\n' "$st $runner" >"$tmp/told"
                    case $st in
                    queued) say "waiting for a runner" ;;
                    leased) say "leased to runner ${runner:-?}" ;;
                    running) say "running on ${runner:-?}" ;;
                    esac
                fi
                ;;
            end)
                printf '%s %s\n' "$(field status "$data")" "$(field exit_code "$data")" >"$tmp/end"
                return 0
                ;;
            esac
            ev=
            data=
            eid=
            ;;
        esac
    done
}

cancel_run() {
    if ! api -X POST "$url/api/v1/action-runs/$id/cancel/"; then
        die 69 "cannot reach the coordinator to cancel run $id; it goes on"
    fi
    status=$(cat "$tmp/status")
    case $status in
    200) say "canceled run $id" ;;
    202) say "canceling run $id: its runner stops it" ;;
    409) say "run $id has already ended" ;;
    *) die "$(refused "$status")" "could not cancel run $id ($status: $(cat "$tmp/body")); it goes on" ;;
    esac
}

# What an interrupt does: cancel (once) with MUSTER_CANCEL_ON_INTERRUPT=1,
# else detach. A second interrupt while canceling detaches too.
on_interrupt() {
    code=$interrupted
    interrupted=
    if [ "$canceling" = 1 ] || [ "$cancel_on_interrupt" = 0 ]; then
        say "detached; run $id goes on. Its log and status: $url/api/v1/action-runs/$id/logs/ (or: muster runs logs -f $id)"
        exit "$code"
    fi
    cancel_run
    canceling=1
}

mkfifo "$tmp/stream" || die 1 "cannot create a FIFO in $tmp"
canceling=0
failures=0
while :; do
    [ -z "$interrupted" ] || on_interrupt
    last=$(cat "$tmp/last" 2>/dev/null || echo 0)
    : >"$tmp/headers"
    # Both in the background, so that a signal interrupts `wait` at once.
    curl -sS -N -A "$agent" -H @"$tmp/auth" -H 'Accept: text/event-stream' \
        -H "Last-Event-ID: $last" -D "$tmp/headers" \
        "$url/api/v1/action-runs/$id/logs/" >"$tmp/stream" &
    streamer=$!
    read_events <"$tmp/stream" &
    follower=$!
    wait "$follower"
    if [ -n "$interrupted" ]; then
        kill "$streamer" "$follower" 2>/dev/null
        wait "$streamer" 2>/dev/null
        continue
    fi
    wait "$streamer"
    [ -s "$tmp/end" ] && break
    status=$(sed -n '1s/^HTTP\/[0-9.]* \([0-9]*\).*/\1/p' "$tmp/headers")
    case $status in
    2??) # the stream broke: resume where it did
        failures=0
        sleep 1
        ;;
    4??) die "$(refused "$status")" "the coordinator answered $status for the log of run $id" ;;
    *)
        failures=$((failures + 1))
        [ "$failures" -le 30 ] || die 69 "cannot reach the coordinator at $url"
        say "lost the coordinator${status:+ ($status)}; reconnecting"
        sleep 1
        ;;
    esac
done

read -r status code <"$tmp/end"
case $status in
succeeded) rc=0 ;;
failed)
    rc=${code:-1}
    case $rc in
    '' | *[!0-9]* | 0) rc=1 ;;
    esac
    [ "$rc" -le 255 ] || rc=255
    ;;
timed_out) rc=124 ;;
lost) rc=125 ;;
*) rc=130 ;;
esac
if [ "$status" = failed ] && [ -n "$code" ]; then
    say "run $id failed with exit code $code"
else
    say "run $id $status"
fi
exit "$rc"
