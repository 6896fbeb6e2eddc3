-- wrk script for scripts/bench: POST signed Clockify NEW_TIME_ENTRY bodies, each one a different time entry
-- (a counter in the entry id and description) so that dedup never short-cuts a request and deliveries are
-- not serialised behind one entity's ordering key; report one parseable line.
wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
wrk.headers["user-agent"] = "Vert.x-WebClient/4.2.5"
wrk.headers["clockify-signature"] = os.getenv("BENCH_SECRET")
wrk.headers["clockify-webhook-event-type"] = "NEW_TIME_ENTRY"
local f = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
local template = f:read("*a")
f:close()
local a, b, c = template:match('^(.-"id": ")[0-9a-f]+(".-"description": ")(.*)$')
assert(a, "the body needs a top-level id before its description")

-- BENCH_NONCE differs per wrk run, so that no two runs send the same event.
local nonce = tonumber(os.getenv("BENCH_NONCE") or "0")
local counter = 0
local thread_id = 0

function setup(thread)
  thread_id = thread_id + 1
  thread:set("tid", thread_id)
end

function request()
  counter = counter + 1
  local n = string.format("%08x%04x%012x", nonce, tid, counter)
  return wrk.format(nil, nil, nil, a .. n .. b .. n .. " " .. c)
end

function done(summary, latency, requests)
  local seconds = summary.duration / 1e6
  local errors = summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout
  io.write(string.format("RESULT requests=%d rps=%.1f p50_ms=%.3f p99_ms=%.3f errors=%d non2xx=%d\n",
    summary.requests, summary.requests / seconds, latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    errors, summary.errors.status))
end
