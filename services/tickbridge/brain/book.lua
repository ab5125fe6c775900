-- Order books on the Brain (issue 17). Not a library of its own: `brain/common.py` puts this text into the
-- tickbridge_brain library ahead of brain.lua's functions, so the ingest call applies a book entry or a diff
-- in the same atomic step that writes and acks it.
--
-- Per symbol, four keys (`core/keys.py` book_keys): state hash {last_update_id, timestamp, recv_ts, valid,
-- reason}, bids and asks sorted sets (member = the price string, score = the price) and a quantity hash
-- ('b' .. price / 'a' .. price -> the quantity string). Exact decimal strings stay exact; the score only
-- orders them. Rules (Binance's, applied by the Brain itself):
--   BOOK at u: replaces the book and makes it valid, unless the book is valid and already at u or later;
--   DEPTH [U, u] on a valid book at L: u <= L stale (ignored); U <= L + 1 apply; U > L + 1 a break: invalid;
--   any diff on an invalid or missing book: ignored, and the symbol is asked for (the wanted set);
--   RESYNC after u (the collector's book stopped being valid: a gap, a disconnect): invalid, unless past u.
-- Never serves an invalid book as valid: the reader gets the state hash with the levels in one call.

local function book_call(cmd, key, args)
  -- One command for many levels, in chunks (Lua's C stack limits unpack); calls cost more than the work.
  for from = 1, #args, 2000 do
    redis.call(cmd, key, unpack(args, from, math.min(from + 1999, #args)))
  end
end

local function book_levels(zkey, qkey, tag, args, from, n)
  -- args[from .. from + n - 1] = price, qty, ... (absolute quantities; a zero quantity removes the level, and
  -- removing an absent level is fine).
  local z, h, zrem, hdel = {}, {}, {}, {}
  for j = from, from + n - 1, 2 do
    local price, qty = args[j], args[j + 1]
    if tonumber(qty) == 0 then
      zrem[#zrem + 1] = price
      hdel[#hdel + 1] = tag .. price
    else
      -- The price string is the score too: Redis parses it; a Lua number would be formatted back with %.17g.
      z[#z + 1] = price; z[#z + 1] = price
      h[#h + 1] = tag .. price; h[#h + 1] = qty
    end
  end
  book_call('ZREM', zkey, zrem)
  book_call('HDEL', qkey, hdel)
  book_call('ZADD', zkey, z)
  book_call('HSET', qkey, h)
end

-- Both sides from args[at]: nb, nb values (bids), na, na values (asks).
local function book_sides(keys, k, args, at)
  local nb = tonumber(args[at])
  book_levels(keys[k + 1], keys[k + 3], 'b', args, at + 1, nb)
  book_levels(keys[k + 2], keys[k + 3], 'a', args, at + 2 + nb, tonumber(args[at + 1 + nb]))
end

-- A diff for the book at keys[k..k+3] (wanted set keys[k+4]), its levels at args[at] (`book_sides`).
-- Returns 'applied', 'stale', 'invalid' or 'gap'.
local function book_diff(keys, k, symbol, first_id, last_id, ts, args, at, recv_ts)
  local state = keys[k]
  local st = redis.call('HMGET', state, 'valid', 'last_update_id')
  if st[1] ~= '1' then
    redis.call('SADD', keys[k + 4], symbol)
    return 'invalid'
  end
  local last, u = tonumber(st[2]), tonumber(last_id)
  if u <= last then
    return 'stale'
  end
  if tonumber(first_id) > last + 1 then
    redis.call('HSET', state, 'valid', '0', 'reason', 'update-ID break: book at ' .. st[2] .. ', diff from ' .. first_id)
    redis.call('SADD', keys[k + 4], symbol)
    return 'gap'
  end
  book_sides(keys, k, args, at)
  redis.call('HSET', state, 'last_update_id', last_id, 'timestamp', ts, 'recv_ts', recv_ts)
  return 'applied'
end

-- A whole book, its levels at args[at] (`book_sides`). Returns 'replaced' or 'stale'.
local function book_snapshot(keys, k, symbol, last_id, ts, args, at, recv_ts)
  local state = keys[k]
  local st = redis.call('HMGET', state, 'valid', 'last_update_id')
  if st[1] == '1' and tonumber(st[2]) >= tonumber(last_id) then
    return 'stale'
  end
  redis.call('DEL', keys[k + 1], keys[k + 2], keys[k + 3])
  book_sides(keys, k, args, at)
  redis.call('HSET', state, 'valid', '1', 'reason', '', 'last_update_id', last_id, 'timestamp', ts, 'recv_ts', recv_ts)
  redis.call('SREM', keys[k + 4], symbol)
  return 'replaced'
end

-- The collector's book stopped being valid after last_id (RESYNC): so does this one, unless it is already past
-- that ID (a newer whole book came first). No request: the collector sends its whole book when it is valid.
local function book_reset(keys, k, last_id, reason)
  local state = keys[k]
  local st = redis.call('HMGET', state, 'valid', 'last_update_id')
  if st[1] == '1' and tonumber(st[2]) <= tonumber(last_id) then
    redis.call('HSET', state, 'valid', '0', 'reason', 'VPS book not valid after ' .. last_id .. ': ' .. reason)
    return 'reset'
  end
  return 'stale'
end

-- One book entry (BOOK, RESYNC or DEPTH) whose nfields contract fields start at args[i + 1] and whose levels
-- start at args[levels_at] (`book_sides`): the dispatch the ingest call and `tickbridge_book_apply` share.
local function book_entry(keys, k, args, i, levels_at)
  local kind = args[i + 6]
  if kind == 'BOOK' then
    return book_snapshot(keys, k, args[i + 2], args[i + 10], args[i + 8], args, levels_at, args[i + 16])
  elseif kind == 'RESYNC' then
    return book_reset(keys, k, args[i + 10], args[i + 12])
  end
  return book_diff(keys, k, args[i + 2], args[i + 10], args[i + 12], args[i + 8], args, levels_at, args[i + 18])
end

-- The fast-forward live lane's book entries (issue 16), applied to the books only (no stream, no group): while a
-- backlog replays, the newest whole book and the diffs after it make a book valid and current at once. The
-- rules above make it safe to see an entry twice (the ordered replay brings it again: stale) or in any order
-- of the two lanes (an older diff after a newer book is stale; a newer diff on an older book is a break that
-- asks for a whole book). ARGV = records: book_index, nfields, field, value, ..., nb, bids..., na, asks...
local function book_apply(keys, args)
  local i, n, applied = 1, #args, 0
  while i <= n do
    local k, nfields = tonumber(args[i]), tonumber(args[i + 1])
    local fields_at = i + 1
    local levels_at = fields_at + 1 + nfields
    local nb = tonumber(args[levels_at])
    local next_i = levels_at + 2 + nb + tonumber(args[levels_at + 1 + nb])
    local outcome = book_entry(keys, k, args, fields_at, levels_at)
    if outcome == 'applied' or outcome == 'replaced' or outcome == 'reset' then applied = applied + 1 end
    i = next_i
  end
  return applied
end

redis.register_function('tickbridge_book_apply', book_apply)

-- KEYS = state, bids, asks, qty; ARGV = depth. Returns {state as flat pairs, bids {p, q, ...} high->low,
-- asks {p, q, ...} low->high}, all read in one step (levels and state always of the same update ID).
local function book_read(keys, args)
  local depth = tonumber(args[1])
  local out = {redis.call('HGETALL', keys[1])}
  for i, side in ipairs({{keys[2], 'ZREVRANGE', 'b'}, {keys[3], 'ZRANGE', 'a'}}) do
    local prices = redis.call(side[2], side[1], 0, depth - 1)
    local flat = {}
    for from = 1, #prices, 2000 do
      local fields = {}
      for j = from, math.min(from + 1999, #prices) do fields[#fields + 1] = side[3] .. prices[j] end
      local qtys = redis.call('HMGET', keys[4], unpack(fields))
      for j, q in ipairs(qtys) do
        flat[#flat + 1] = prices[from + j - 1]
        flat[#flat + 1] = q or ''
      end
    end
    out[i + 1] = flat
  end
  return out
end

redis.register_function{function_name = 'tickbridge_book_read', callback = book_read, flags = {'no-writes'}}
