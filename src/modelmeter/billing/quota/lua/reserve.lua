-- Reserve (after prelude, usage_cost and draw). ARGV: ttl, id, hold_ms, has_baseline, amount x6 (5-10), caps x6
-- ('' = uncapped, 11-16), baseline x6 (17-22), credit terms (23: JSON {"epoch", "now", "prepaid", "grants"?:
-- [[id, rank, expires_at, "micro"], ...]}, '' = none), prices (24: '' = not priced, else the text
-- ``_price_args`` writes), the period's drawn baseline (25, micro-cents). The counters hash also keeps
-- ``d_micro``: the period's credit draws, held and settled (``drawdown.due_micro``). Returns -1: counters unknown
-- (send a baseline); -2: grants unknown (send them); 0: refused; {1, grant, micro, ...}: held, with its draws.
if redis.call('EXISTS', KEYS[1]) == 0 then
  if ARGV[4] == '0' then return -1 end
  for i = 1, N do redis.call('HSET', KEYS[1], C[i], ARGV[16 + i], R[i], '0') end
  redis.call('HSET', KEYS[1], 'd_micro', ARGV[25])
end
local terms = nil
if ARGV[23] ~= '' then
  terms = cjson.decode(ARGV[23])
  if tonumber(redis.call('HGET', KEYS[4], 'epoch') or '-1') < terms.epoch then
    if terms.grants == nil then return -2 end
    for _, g in ipairs(terms.grants) do
      -- Only grants not held yet: a held grant's balance is more current than the ledger's.
      if redis.call('HSETNX', KEYS[4], 'r:' .. g[1], g[4]) == 1 then
        redis.call('HSET', KEYS[4], 'm:' .. g[1], g[2] .. ' ' .. string.format('%d', g[3]))
      end
    end
    redis.call('HSET', KEYS[4], 'epoch', string.format('%d', terms.epoch))
  end
end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', string.format('%d', now_ms), 'LIMIT', 0, 64)
for _, id in ipairs(expired) do lapse_hold(id) end
local cur = redis.call('HMGET', KEYS[1], unpack(C))
local held = redis.call('HMGET', KEYS[1], unpack(R))
local before, totals = {}, {}
for i = 1, N do
  before[i] = tonumber(cur[i] or '0') + tonumber(held[i] or '0')
  totals[i] = before[i] + tonumber(ARGV[4 + i])
end
local prices = nil
if ARGV[24] ~= '' then prices = read_prices(ARGV[24]) end
local cost_after = totals[4]
if prices then
  -- The budget is the exact usage cost of the totals, allowances and tiers included.
  cost_after = usage_cost(totals, prices)
end
for i = 1, N do
  local cap = ARGV[10 + i]
  local total = totals[i]
  if i == 4 then total = cost_after end
  if cap ~= '' and total > tonumber(cap) then
    touch()
    return 0
  end
end
local drawn = {}
if terms then
  local due = cost_after - before[4]
  if prices then due = cost_after - usage_cost(before, prices) end
  -- Mirrors drawdown.due_micro: never past the period's cost less what it has drawn.
  due = math.min(due, cost_after - tonumber(redis.call('HGET', KEYS[1], 'd_micro') or '0'))
  if due > 0 then
    local grants, available = live_grants(terms.now)
    if terms.prepaid and available < due then
      touch()
      return 0
    end
    for _, g in ipairs(grants) do
      if due <= 0 then break end
      local take = math.min(due, g[3])
      drawn[#drawn + 1] = g[1]
      drawn[#drawn + 1] = string.format('%d', take)
      due = due - take
    end
  end
end
for i = 1, N do incr(R[i], ARGV[4 + i], '') end
redis.call('HSET', KEYS[2], ARGV[2], table.concat({ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10]}, ' '))
redis.call('ZADD', KEYS[3], string.format('%d', now_ms + tonumber(ARGV[3])), ARGV[2])
if #drawn > 0 then
  for i = 1, #drawn, 2 do
    redis.call('HINCRBY', KEYS[4], 'r:' .. drawn[i], '-' .. drawn[i + 1])
    redis.call('HINCRBY', KEYS[1], 'd_micro', drawn[i + 1])
  end
  redis.call('HSET', KEYS[2], 'd:' .. ARGV[2], table.concat(drawn, ' '))
end
touch()
local out = {1}
for i = 1, #drawn do out[#out + 1] = drawn[i] end
return out
