#!lua name=tickbridge_brain

-- One atomic step per consumer batch: append each Brain-stream entry to its target stream and XACK
-- it; if the XACK returned 0 (another consumer or an earlier attempt already did the work) the
-- append is undone (XDEL) before anyone can see it, and a trade goes to the WARM sorted set only if
-- acked. A crash before the call changes nothing; after it, the entry is written exactly once.
-- An XADD that fails (e.g. WRONGTYPE: the target key is not a stream) leaves its entry unacked,
-- still pending, to be retried and, if it keeps failing, dead-lettered by the consumer; the call goes
-- on with the other entries, WARM included. (Stopping the call there, as redis.call would, left the
-- entries before it written and acked but never in WARM.) A failure is per key, so the entries of one
-- symbol all fail or all succeed together and its order holds.
--
-- KEYS[1] = the Brain stream; KEYS[2..] = target streams and WARM sorted sets, referenced by index.
-- ARGV = group, warm_window_us, H, then H triples (trade stream index k, symbol, exchange): the
-- trade stream KEYS[k] has its WARM zset at KEYS[k + 1]. Then records, each starting with a kind:
--   'T', k, count, then count x (id, price, volume, side, timestamp, trade_id, recv_ts): trades in the
--        contract's field order for the key pair k (the common case)
--   'w', id, target_index, warm_index, score, member, nfields, field, value, ...: any other valid trade
--   'p', id, target_index, nfields, field, value, ...: an order-book diff
--   'q', id, target_index, book_index, nfields, field, value, ..., nb, bid price, qty, ..., na, ask price, qty,
--        ...: an order-book diff or whole book (BOOK) in the contract's field order, also applied to the
--        Brain's book at KEYS[book_index..+4] (book.lua); its levels follow flat (nb, na: values, not levels),
--        so the call needs no JSON decoding; a book reset (RESYNC) marks the book invalid

--   'D', id, dead_letter_index, maxlen, nfields, field, value, ... (with the reason): a dead letter, in a
--        stream capped at maxlen entries (XADD MAXLEN =; the evicted oldest ones are counted)
--   'd', id, dead_letter_index, nfields, field, value, ...: a dead letter without a cap (older consumers)
-- Arguments cost more than the commands here, so the common case sends as few as possible.
-- A record of more than MAX_UNPACK values (Lua's C stack limits `unpack`, and a script error would fail
-- the batch on every retry) is never unpacked: a dead letter is written without the entry's fields (and
-- acked), a tick is left pending (the consumer dead-letters it after its delivery limit).
-- Returns {written, already_acked, failed WARM commands, entries left pending, first error or '',
-- dead letters evicted by the cap}.
local MAX_UNPACK = 4000

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

-- One ZADD per WARM key (in chunks: Lua's C stack limits unpack), then keep the last `window` µs
-- before its newest tick. WARM is a cache: a failing command (a key of the wrong type) is counted
-- and returned, and the ticks stay written. Returns the number of failed commands.
local function write_warm(warm, window)
  local failed = 0
  for zkey, entry in pairs(warm) do
    local za = entry.args
    for from = 1, #za, 2000 do
      local r = redis.pcall('ZADD', zkey, unpack(za, from, math.min(from + 1999, #za)))
      if type(r) == 'table' and r.err then failed = failed + 1 end
    end
    local r = redis.pcall('ZREMRANGEBYSCORE', zkey, '-inf', '(' .. string.format('%.0f', entry.newest - window))
    if type(r) == 'table' and r.err then failed = failed + 1 end
  end
  return failed
end

local function ingest(keys, args)
  local stream = keys[1]
  local group = args[1]
  local window = tonumber(args[2])
  local pairs_count = tonumber(args[3])
  local symbol_of, exchange_of = {}, {}
  local i = 4
  for _ = 1, pairs_count do
    local k = tonumber(args[i])
    symbol_of[k], exchange_of[k] = args[i + 1], args[i + 2]
    i = i + 3
  end
  local n = #args
  local written, dup, failed, first_err, evicted = 0, 0, 0, '', 0
  local warm = {}
  local call, pcall_ = redis.call, redis.pcall
  while i <= n do
    local kind = args[i]
    if kind == 'T' then
      -- A run of `count` trades for the key pair k: id, price, volume, side, timestamp, trade_id, recv_ts.
      local k = tonumber(args[i + 1])
      local count = tonumber(args[i + 2])
      local target, zkey, symbol, exchange = keys[k], keys[k + 1], symbol_of[k], exchange_of[k]
      i = i + 3
      for _ = 1, count do
        local id, price, volume, side, ts, trade_id, recv_ts =
          args[i], args[i + 1], args[i + 2], args[i + 3], args[i + 4], args[i + 5], args[i + 6]
        local new_id = pcall_('XADD', target, '*', 'src_id', id, 'symbol', symbol, 'exchange', exchange,
                              'type', 'TRADE', 'price', price, 'volume', volume, 'side', side, 'timestamp', ts,
                              'trade_id', trade_id, 'recv_ts', recv_ts)
        if type(new_id) == 'table' then
          failed = failed + 1
          if first_err == '' then first_err = target .. ': ' .. new_id.err end
        elseif call('XACK', stream, group, id) == 1 then
          add_warm(warm, zkey, tonumber(ts), trade_id .. '|' .. price .. '|' .. volume .. '|' .. side .. '|' .. recv_ts)
          written = written + 1
        else
          call('XDEL', target, new_id)
          dup = dup + 1
        end
        i = i + 7
      end
    else
      local id = args[i + 1]
      local k = tonumber(args[i + 2])
      i = i + 3
      local warm_index, score, member, maxlen = 0, nil, nil, nil
      if kind == 'w' then
        warm_index, score, member = tonumber(args[i]), tonumber(args[i + 1]), args[i + 2]
        i = i + 3
      elseif kind == 'D' then
        maxlen = args[i]
        i = i + 1
      end
      local book_index = 0
      if kind == 'q' then
        book_index = tonumber(args[i])
        i = i + 1
      end
      local nfields = tonumber(args[i])
      local next_i, levels_at = i + 1 + nfields, 0
      if book_index > 0 then
        levels_at = next_i
        next_i = next_i + 2 + tonumber(args[next_i]) + tonumber(args[next_i + 1 + tonumber(args[next_i])])
      end
      local dead_letter = kind == 'd' or kind == 'D'
      local before = 0
      if maxlen then
        before = pcall_('XLEN', keys[k])
      end
      local new_id
      if nfields <= MAX_UNPACK and i + nfields <= n then
        if maxlen then
          new_id = pcall_('XADD', keys[k], 'MAXLEN', '=', maxlen, '*', 'src_id', id, unpack(args, i + 1, i + nfields))
        else
          new_id = pcall_('XADD', keys[k], '*', 'src_id', id, unpack(args, i + 1, i + nfields))
        end
      elseif dead_letter then
        local note = 'record of ' .. nfields .. ' values: fields not copied (too many to unpack)'
        if maxlen then
          new_id = pcall_('XADD', keys[k], 'MAXLEN', '=', maxlen, '*', 'src_id', id, 'reason', note)
        else
          new_id = pcall_('XADD', keys[k], '*', 'src_id', id, 'reason', note)
        end
      else
        new_id = {err = 'record of ' .. nfields .. ' values: too many to unpack'}
      end
      if type(new_id) ~= 'table' and maxlen and type(before) == 'number' then
        local after = call('XLEN', keys[k])
        if after < before + 1 then evicted = evicted + before + 1 - after end
      end
      if type(new_id) == 'table' then
        failed = failed + 1
        if first_err == '' then first_err = keys[k] .. ': ' .. new_id.err end
      elseif call('XACK', stream, group, id) == 1 then
        if warm_index > 0 then
          add_warm(warm, keys[warm_index], score, member)
        end
        if book_index > 0 then
          book_entry(keys, book_index, args, i, levels_at)
        end
        written = written + 1
      else
        call('XDEL', keys[k], new_id)
        dup = dup + 1
      end
      i = next_i
    end
  end
  return {written, dup, write_warm(warm, window), failed, first_err, evicted}
end

redis.register_function('tickbridge_brain_ingest', ingest)

-- Put a consumer dead letter back after its cause was fixed: append the tick to its per-symbol stream
-- and delete the dead letter in one step (a failing XADD stops the call before the XDEL, so the dead
-- letter stays). A trade inside WARM's window (or any, if WARM is empty) also goes to WARM, which must
-- hold every trade of its window; an older one stays out, or WARM would claim trades it lacks.
-- KEYS = dead-letter stream, target stream, WARM sorted set ('' args for a depth diff);
-- ARGV = dead-letter ID, window_us, WARM score or '', WARM member or '', field, value, ...
-- Returns 1, or 0 if the dead letter was already gone (replayed by someone else).
local function replay(keys, args)
  if #redis.call('XRANGE', keys[1], args[1], args[1]) == 0 then
    return 0
  end
  redis.call('XADD', keys[2], '*', unpack(args, 5))
  redis.call('XDEL', keys[1], args[1])
  if args[3] ~= '' then
    local window, score = tonumber(args[2]), tonumber(args[3])
    -- WARM is a cache: a WARM key of the wrong type is left alone, the tick is back in its stream.
    local newest = redis.pcall('ZRANGE', keys[3], -1, -1, 'WITHSCORES')
    if type(newest) == 'table' and not newest.err then
      local top = newest[2] and tonumber(newest[2]) or nil
      if top == nil or score >= top - window then
        redis.call('ZADD', keys[3], score, args[4])
        if top ~= nil and score > top then
          redis.call('ZREMRANGEBYSCORE', keys[3], '-inf', '(' .. string.format('%.0f', score - window))
        end
      end
    end
  end
  return 1
end

redis.register_function('tickbridge_brain_replay', replay)
