#!lua name=tickbridge_brain

-- One atomic step per consumer batch: XACK each Brain-stream entry and, only if this call acked it
-- (XACK returned 1), append it to its target stream (and a trade to the WARM sorted set). A crash
-- before the call changes nothing; after it, the entry is acked and written exactly once. XACK == 0
-- means another consumer (or an earlier attempt) already did the work. Trades in the contract's
-- field order travel as their 9 values only (names added here) to keep the call small on the wire.
--
-- KEYS[1] = the Brain stream; KEYS[2..] = target streams and WARM sorted sets, referenced by index.
-- ARGV = group, warm_window_us, then per entry: id, target_index, warm_index (0 = none), kind, ...
--   kind 't': a trade in the contract's field order, followed by its 9 values
--   kind 'w': any other valid trade, followed by score, member, nfields, field, value, ...
--   kind 'p': an order-book diff, followed by nfields, field, value, ...
--   kind 'd': dead letter, followed by the reason, nfields, field, value, ... (target = dead-letter stream)
-- Returns {written, already_acked}.
local function add_warm(warm, zkey, score, member)
  local entry = warm[zkey]
  if entry == nil then
    entry = {args = {}, newest = score}
    warm[zkey] = entry
  end
  local za = entry.args
  za[#za + 1] = score
  za[#za + 1] = member
  if entry.newest < score then
    entry.newest = score
  end
end

local function ingest(keys, args)
  local stream = keys[1]
  local group = args[1]
  local window = tonumber(args[2])
  local n = #args
  local i = 3
  local written, dup = 0, 0
  local warm = {}
  local call = redis.call
  while i <= n do
    local id = args[i]
    local target = keys[tonumber(args[i + 1])]
    local warm_index = tonumber(args[i + 2])
    local kind = args[i + 3]
    i = i + 4
    if kind == 't' then
      if call('XACK', stream, group, id) == 1 then
        call('XADD', target, '*', 'src_id', id, 'symbol', args[i], 'exchange', args[i + 1], 'type', args[i + 2],
             'price', args[i + 3], 'volume', args[i + 4], 'side', args[i + 5], 'timestamp', args[i + 6],
             'trade_id', args[i + 7], 'recv_ts', args[i + 8])
        local member = args[i + 7] .. '|' .. args[i + 3] .. '|' .. args[i + 4] .. '|' .. args[i + 5] .. '|' .. args[i + 8]
        add_warm(warm, keys[warm_index], tonumber(args[i + 6]), member)
        written = written + 1
      else
        dup = dup + 1
      end
      i = i + 9
    else
      local score, member
      if kind == 'w' then
        score, member = tonumber(args[i]), args[i + 1]
        i = i + 2
      end
      local nfields = tonumber(args[i])
      if call('XACK', stream, group, id) == 1 then
        call('XADD', target, '*', 'src_id', id, unpack(args, i + 1, i + nfields))
        if warm_index > 0 then
          add_warm(warm, keys[warm_index], score, member)
        end
        written = written + 1
      else
        dup = dup + 1
      end
      i = i + 1 + nfields
    end
  end
  -- One ZADD per WARM key (in chunks: Lua's C stack limits unpack), then keep the last `window` µs
  -- before its newest tick.
  for zkey, entry in pairs(warm) do
    local za = entry.args
    for from = 1, #za, 2000 do
      call('ZADD', zkey, unpack(za, from, math.min(from + 1999, #za)))
    end
    call('ZREMRANGEBYSCORE', zkey, '-inf', '(' .. string.format('%.0f', entry.newest - window))
  end
  return {written, dup}
end

redis.register_function('tickbridge_brain_ingest', ingest)
