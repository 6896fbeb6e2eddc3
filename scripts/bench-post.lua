-- wrk script for scripts/bench: POST a signed Clockify NEW_TIME_ENTRY body, report one parseable line.
wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
wrk.headers["user-agent"] = "Vert.x-WebClient/4.2.5"
wrk.headers["clockify-signature"] = os.getenv("BENCH_SECRET")
wrk.headers["clockify-webhook-event-type"] = "NEW_TIME_ENTRY"
local f = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
wrk.body = f:read("*a")
f:close()

function done(summary, latency, requests)
  local seconds = summary.duration / 1e6
  local errors = summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout
  io.write(string.format("RESULT requests=%d rps=%.1f p50_ms=%.3f p99_ms=%.3f errors=%d non2xx=%d\n",
    summary.requests, summary.requests / seconds, latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    errors, summary.errors.status))
end
