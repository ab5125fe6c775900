#!lua name=tickbridge_brain

-- One atomic step per consumer batch: append each Brain-stream entry to its target stream (trades also to
-- the WARM sorted set) and move the consumer group past the batch (issue 20: the group is a durable cursor).
-- The consumer reads with XREAD from the group's last-delivered ID and passes that ID as `position`; the
-- call writes nothing unless the group is still there (another consumer moved it: `moved` = 1, the caller
-- re-reads from the group), then writes every entry and moves the group to `last_id` with XGROUP SETID
-- (ENTRIESREAD kept valid, so XINFO GROUPS' lag stays right). Keys written and cursor moved are one step: no
-- pending list, no per-entry XACK, no claims, and a crash before or after the call never duplicates.
-- Nothing after the first write may raise (a Lua error does not undo earlier writes, and the group would
-- stay put: the retry would write them twice): appends use pcall, the book update runs under Lua's pcall.
-- An append that fails (e.g. WRONGTYPE: the target key is not a stream) sends its entry to the dead-letter
-- stream in the same step, with the error as reason (`failed` counts them; replayable once the key is fixed).
-- A failure is per key, so the entries of one symbol all fail or all succeed together and its order holds.
--
-- `position` '' is the upgrade mode: entries left pending by a consumer of an older version (which read
-- with XREADGROUP) are each XACKed first and written only if the XACK returned 1 (not done before); the
-- group is not moved (it is past them already).
--
-- KEYS[1] = the Brain stream, KEYS[2] = the dead-letter stream; KEYS[3..] = target streams and WARM sorted
-- sets, referenced by index.
-- ARGV = group, warm_window_us, position, last_id, count (entries in the batch), dead_letter_maxlen, H, then H
-- triples (trade stream index k, symbol, exchange): the trade stream KEYS[k] has its WARM zset at KEYS[k + 1].
-- Then records, each starting with a kind:
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
-- the batch on every retry) is never unpacked: a dead letter is written without the entry's fields.
-- Returns {written, already_acked (upgrade mode), failed WARM commands, entries dead-lettered after a failed
-- append, first error or '', dead letters evicted by the cap, moved}.
local MAX_UNPACK = 4000

-- `score` is the timestamp string as received: ZADD parses it (a Lua number would be formatted back with %.17g,
-- the costliest step per tick); its value only finds the newest.
local function add_warm(warm, zkey, score, member)
  local value = tonumber(score)
  local entry = warm[zkey]
  if entry == nil then
    entry = {args = {}, newest = value}
    warm[zkey] = entry
  end
  local za = entry.args
  za[#za + 1] = score
  za[#za + 1] = member
  if entry.newest < value then
    entry.newest = value
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

-- The group's last-delivered ID, entries-read and lag (each false when Redis does not know it), or nil without
-- the group.
local function group_state(stream, group)
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local name, last, read, lag = nil, nil, false, false
    for j = 1, #g, 2 do
      local f = g[j]
      if f == 'name' then name = g[j + 1]
      elseif f == 'last-delivered-id' then last = g[j + 1]
      elseif f == 'entries-read' then read = g[j + 1]
      elseif f == 'lag' then lag = g[j + 1] end
    end
    if name == group then return last, read, lag end
  end
  return nil, false, false
end

-- Move the group to `last_id`. Its entries-read is the old count plus the batch (the batch is every entry
-- after the old position: XREAD from it, and nothing is trimmed above the group). Unknown (a group created at
-- 0, an upgrade, a SETID by hand), it is the stream's entries-added less the lag Redis estimates, or, without
-- that, learned once the group reaches the stream's top (one XINFO STREAM per batch until then).
local function move_group(stream, group, last_id, read, lag, count)
  if read then
    return redis.call('XGROUP', 'SETID', stream, group, last_id, 'ENTRIESREAD', read + count)
  end
  local info = redis.call('XINFO', 'STREAM', stream)
  local added, top = nil, nil
  for j = 1, #info, 2 do
    if info[j] == 'entries-added' then added = info[j + 1]
    elseif info[j] == 'last-generated-id' then top = info[j + 1] end
  end
  if added and lag then
    return redis.call('XGROUP', 'SETID', stream, group, last_id, 'ENTRIESREAD', added - lag + count)
  elseif added and top == last_id then
    return redis.call('XGROUP', 'SETID', stream, group, last_id, 'ENTRIESREAD', added)
  end
  return redis.call('XGROUP', 'SETID', stream, group, last_id)
end

-- An entry whose append failed goes to the dead-letter stream with the error (its fields after it).
local function dead_letter(dl, maxlen, id, err, fields)
  local r = redis.pcall('XADD', dl, 'MAXLEN', '=', maxlen, '*', 'src_id', id, 'reason', 'append failed: ' .. err,
                        unpack(fields))
  return type(r) ~= 'table'
end

local function ingest(keys, args)
  local stream, dl = keys[1], keys[2]
  local group = args[1]
  local window = tonumber(args[2])
  local position, last_id, count, dl_maxlen = args[3], args[4], tonumber(args[5]), args[6]
  local acking = position == ''
  local read, lag = false, false
  if not acking then
    local last
    last, read, lag = group_state(stream, group)
    if last == nil then
      return redis.error_reply('NOGROUP no group ' .. group .. ' on ' .. stream)
    end
    if last ~= position then
      return {0, 0, 0, 0, '', 0, 1}
    end
  end
  local pairs_count = tonumber(args[7])
  local symbol_of, exchange_of = {}, {}
  local i = 8
  for _ = 1, pairs_count do
    local k = tonumber(args[i])
    symbol_of[k], exchange_of[k] = args[i + 1], args[i + 2]
    i = i + 3
  end
  local n = #args
  local written, dup, failed, first_err, evicted = 0, 0, 0, '', 0
  local warm = {}
  local call, pcall_ = redis.call, redis.pcall
  local function fail(key, id, err, fields)
    failed = failed + 1
    if first_err == '' then first_err = key .. ': ' .. err end
    if not dead_letter(dl, dl_maxlen, id, err, fields) and first_err ~= '' then
      first_err = first_err .. ' (and its dead letter failed: the entry is lost)'
    end
  end
  while i <= n do
    local kind = args[i]
    if kind == 'T' then
      -- A run of `count` trades for the key pair k: id, price, volume, side, timestamp, trade_id, recv_ts.
      local k = tonumber(args[i + 1])
      local runs = tonumber(args[i + 2])
      local target, zkey, symbol, exchange = keys[k], keys[k + 1], symbol_of[k], exchange_of[k]
      i = i + 3
      for _ = 1, runs do
        local id, price, volume, side, ts, trade_id, recv_ts =
          args[i], args[i + 1], args[i + 2], args[i + 3], args[i + 4], args[i + 5], args[i + 6]
        if acking and call('XACK', stream, group, id) == 0 then
          dup = dup + 1
        else
          local new_id = pcall_('XADD', target, '*', 'src_id', id, 'symbol', symbol, 'exchange', exchange,
                                'type', 'TRADE', 'price', price, 'volume', volume, 'side', side, 'timestamp', ts,
                                'trade_id', trade_id, 'recv_ts', recv_ts)
          if type(new_id) == 'table' then
            fail(target, id, new_id.err, {'symbol', symbol, 'exchange', exchange, 'type', 'TRADE', 'price', price,
                 'volume', volume, 'side', side, 'timestamp', ts, 'trade_id', trade_id, 'recv_ts', recv_ts})
          else
            add_warm(warm, zkey, ts, trade_id .. '|' .. price .. '|' .. volume .. '|' .. side .. '|' .. recv_ts)
            written = written + 1
          end
        end
        i = i + 7
      end
    else
      local id = args[i + 1]
      local k = tonumber(args[i + 2])
      i = i + 3
      local warm_index, score, member, maxlen = 0, nil, nil, nil
      if kind == 'w' then
        warm_index, score, member = tonumber(args[i]), args[i + 1], args[i + 2]
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
      local dead = kind == 'd' or kind == 'D'
      if acking and call('XACK', stream, group, id) == 0 then
        dup = dup + 1
      else
        local before = 0
        if maxlen then
          before = pcall_('XLEN', keys[k])
        end
        local unpackable = nfields <= MAX_UNPACK and i + nfields <= n
        local new_id
        if unpackable then
          if maxlen then
            new_id = pcall_('XADD', keys[k], 'MAXLEN', '=', maxlen, '*', 'src_id', id, unpack(args, i + 1, i + nfields))
          else
            new_id = pcall_('XADD', keys[k], '*', 'src_id', id, unpack(args, i + 1, i + nfields))
          end
        elseif dead then
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
          local after = pcall_('XLEN', keys[k])
          if type(after) == 'number' and after < before + 1 then evicted = evicted + before + 1 - after end
        end
        if type(new_id) == 'table' then
          fail(keys[k], id, new_id.err, unpackable and {unpack(args, i + 1, i + nfields)} or {})
        else
          if warm_index > 0 then
            add_warm(warm, keys[warm_index], score, member)
          end
          if book_index > 0 then
            -- The entry is written: a book key of the wrong type must not raise past this point.
            local ok, err = pcall(book_entry, keys, book_index, args, i, levels_at)
            if not ok and first_err == '' then
              first_err = keys[book_index] .. ': book not updated: ' .. tostring(type(err) == 'table' and err.err or err)
            end
          end
          written = written + 1
        end
      end
      i = next_i
    end
  end
  local warm_failed = write_warm(warm, window)
  if not acking then
    move_group(stream, group, last_id, read, lag, count)
  end
  return {written, dup, warm_failed, failed, first_err, evicted, 0}
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
        redis.call('ZADD', keys[3], args[3], args[4])
        if top ~= nil and score > top then
          redis.call('ZREMRANGEBYSCORE', keys[3], '-inf', '(' .. string.format('%.0f', score - window))
        end
      end
    end
  end
  return 1
end

redis.register_function('tickbridge_brain_replay', replay)
