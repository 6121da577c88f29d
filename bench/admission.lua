-- wrk script: AdmissionReview POSTs (Content-Type application/json) from a manifest of requests.
--
-- The manifest (path in the environment variable BENCH_MANIFEST) has one request per line:
--   <url path><TAB><file holding the JSON body>
-- One request: wrk's static request (cheapest for wrk). Several: each connection's thread cycles
-- through them in order, as the API server fans each object out to the webhooks that match it.
-- At the end, `done` prints one line `BENCH_WRK_RESULT {json}` for the harness to parse.

local function read_file(path)
  local f = assert(io.open(path, "rb"))
  local data = f:read("*a")
  f:close()
  return data
end

local manifest = os.getenv("BENCH_MANIFEST")
local entries = {}
if manifest then
  for line in io.lines(manifest) do
    local path, body_file = line:match("^(%S+)\t(.+)$")
    if path then
      entries[#entries + 1] = { path = path, body = read_file(body_file) }
    end
  end
end
if #entries == 0 then
  error("no requests: set BENCH_MANIFEST to a manifest file of '<path>\\t<body file>' lines")
end

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

if #entries == 1 then
  wrk.path = entries[1].path
  wrk.body = entries[1].body
else
  local formatted = {}
  local index = 0
  function init(args)
    for i, entry in ipairs(entries) do
      formatted[i] = wrk.format("POST", entry.path, nil, entry.body)
    end
  end
  function request()
    index = index % #formatted + 1
    return formatted[index]
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  local parts = {
    string.format('"duration_us":%d', summary.duration),
    string.format('"requests":%d', summary.requests),
    string.format('"bytes":%d', summary.bytes),
    string.format('"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}',
      e.connect, e.read, e.write, e.status, e.timeout),
    string.format('"latency_us":{"min":%d,"max":%d,"mean":%.3f,"stdev":%.3f,' ..
      '"p50":%d,"p75":%d,"p90":%d,"p95":%d,"p99":%d,"p99_9":%d}',
      latency.min, latency.max, latency.mean, latency.stdev,
      latency:percentile(50), latency:percentile(75), latency:percentile(90),
      latency:percentile(95), latency:percentile(99), latency:percentile(99.9)),
    string.format('"entries":%d', #entries),
  }
  io.write("BENCH_WRK_RESULT {" .. table.concat(parts, ",") .. "}\n")
end
