#!lua name=tickbridge_brain

-- One atomic step per consumer batch: XACK each Brain-stream entry and, only if this call acked it
-- (XACK returned 1), append it to its target stream and the WARM sorted set. A crash before the call
-- changes nothing; after it, the entry is acked and written exactly once. XACK == 0 means another
-- consumer (or an earlier attempt) already did the work.
--
-- KEYS[1] = the Brain stream; KEYS[2..] = target streams and WARM sorted sets referenced by index.
-- ARGV = group, warm_window_us, then per entry:
--   id, target_index, warm_index (0 = none), score, member, nfields, field, value, ...
-- Returns {written, already_acked}.
local function ingest(keys, args)
  local stream = keys[1]
  local group = args[1]
  local window = tonumber(args[2])
  local n = #args
  local i = 3
  local written, dup = 0, 0
  local newest = {}
  while i <= n do
    local id = args[i]
    local target = tonumber(args[i + 1])
    local warm = tonumber(args[i + 2])
    local nfields = tonumber(args[i + 5])
    local first = i + 6
    local last = first + nfields - 1
    if redis.call('XACK', stream, group, id) == 1 then
      redis.call('XADD', keys[target], '*', 'src_id', id, unpack(args, first, last))
      if warm > 0 then
        local score = tonumber(args[i + 3])
        redis.call('ZADD', keys[warm], score, args[i + 4])
        if newest[warm] == nil or newest[warm] < score then
          newest[warm] = score
        end
      end
      written = written + 1
    else
      dup = dup + 1
    end
    i = last + 1
  end
  -- WARM keeps the last `window` µs before its newest tick.
  for warm, score in pairs(newest) do
    redis.call('ZREMRANGEBYSCORE', keys[warm], '-inf', '(' .. string.format('%.0f', score - window))
  end
  return {written, dup}
end

redis.register_function('tickbridge_brain_ingest', ingest)
