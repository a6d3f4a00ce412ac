-- The one wrk script every benchmark run uses; the mode picks the workload.
--
--   wrk -t1 -c64 -d20s -s bench/wrk/workload.lua http://127.0.0.1:8080 -- MODE RUN_ID PATH BODY [POOL [HEADER...]]
--
-- The key goes in the Idempotency-Key header, unless BODY holds the placeholder
-- @KEY@: then it goes there instead (an MCP tools/call carries its key in
-- params._meta). Each HEADER ("Name: value") is sent with every request.
--
-- MODE
--   fresh   POST BODY to PATH with a new Idempotency-Key per request:
--           RUN_ID-<thread>-<n>. Every request is a new operation (forward path).
--   replay  POST BODY to PATH with keys RUN_ID-0 .. RUN_ID-(POOL-1), cycling.
--           The harness completes those keys through the proxy first, so every
--           request is a duplicate of a completed operation (replay path).
--   mixed   POST, in blocks of 90 requests: the first 10 share one key and go
--           out back to back (10 concurrent copies: one forwards, the others wait
--           for it or replay it), the other 80 have fresh keys. 9 of every 90
--           requests (10%) are duplicates.
--   get     GET PATH, no key, no body (safe-method passthrough).
--
-- On exit one line is printed for the harness:
--   BENCH_RESULT {"requests":..,"duration_us":..,"latency_us":{..},"errors":{..},
--                 "statuses":{"200":..},"replayed":..}
-- "replayed" counts responses that carried Idempotent-Replayed.

local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

local mode, run_id, path, body, pool
-- The body around the key's placeholder, when the key goes in the body.
local body_head, body_tail
local KEY_SLOT = "@KEY@"
local headers = {}
local n = 0
statuses = {}
replayed = 0

function init(args)
  mode, run_id, path, body = args[1], args[2], args[3], args[4]
  pool = tonumber(args[5] or "0")
  if mode ~= "fresh" and mode ~= "replay" and mode ~= "mixed" and mode ~= "get" then
    error("unknown mode " .. tostring(mode))
  end
  if mode == "replay" and pool < 1 then
    error("replay needs a POOL of completed keys")
  end
  if mode ~= "get" then
    headers["Content-Type"] = "application/json"
  end
  local at = body:find(KEY_SLOT, 1, true)
  if at then
    body_head, body_tail = body:sub(1, at - 1), body:sub(at + #KEY_SLOT)
  end
  for i = 6, #args do
    local name, value = args[i]:match("^([^:]+):%s*(.*)$")
    if not name then
      error("a HEADER is 'Name: value', got " .. args[i])
    end
    headers[name] = value
  end
end

local function key()
  if mode == "replay" then
    -- Threads start at different offsets so they do not walk the pool in step.
    return run_id .. "-" .. ((n + tid * 7919) % pool)
  end
  if mode == "mixed" and n % 90 < 10 then
    return run_id .. "-" .. tid .. "-hot-" .. math.floor(n / 90)
  end
  return run_id .. "-" .. tid .. "-" .. n
end

function request()
  n = n + 1
  if mode == "get" then
    return wrk.format("GET", path, headers, nil)
  end
  if body_head then
    return wrk.format("POST", path, headers, body_head .. key() .. body_tail)
  end
  headers["Idempotency-Key"] = key()
  return wrk.format("POST", path, headers, body)
end

function response(status, response_headers, response_body)
  statuses[status] = (statuses[status] or 0) + 1
  if response_headers["Idempotent-Replayed"] or response_headers["idempotent-replayed"] then
    replayed = replayed + 1
  end
end

function done(summary, latency, requests)
  local merged, total_replayed = {}, 0
  for _, thread in ipairs(threads) do
    for status, count in pairs(thread:get("statuses") or {}) do
      merged[status] = (merged[status] or 0) + count
    end
    total_replayed = total_replayed + (thread:get("replayed") or 0)
  end
  local parts = {}
  for status, count in pairs(merged) do
    table.insert(parts, string.format('"%d":%d', status, count))
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests":%d,"duration_us":%d,'
      .. '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"max":%d,"mean":%.1f},'
      .. '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},'
      .. '"statuses":{%s},"replayed":%d}\n',
    summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean,
    e.connect, e.read, e.write, e.status, e.timeout,
    table.concat(parts, ","), total_replayed))
end
