-- Shared by the scripts that touch one (tenant, period)'s counters. KEYS: the counters hash, the holds hash
-- (id -> "requests tokens training cost batch_requests batch_tokens"; "d:" id -> "grant micro grant micro ..."), the deadlines zset (id by
-- expiry ms), the tenant's credits hash ("epoch"; "r:" grant -> micro-cents left; "m:" grant -> "rank expires_at",
-- expires_at 0 = never). ARGV[1] is always the keys' TTL. Amounts travel as decimal strings and are added with
-- HINCRBY: a Lua number passed back to Redis may be formatted with 14 significant digits, which would corrupt
-- large costs.
-- The dimensions, in ``Amount.values()`` order: requests, tokens, training tokens, cost, and of the requests and
-- tokens those served by batches (a hash written before they existed lacks the last two: HMGET gives nil, read 0).
local C = {'c_requests', 'c_tokens', 'c_training_tokens', 'c_cost_micro', 'c_batch_requests', 'c_batch_tokens'}
local R = {'r_requests', 'r_tokens', 'r_training_tokens', 'r_cost_micro', 'r_batch_requests', 'r_batch_tokens'}
local N = #C
local function touch()
  for i = 1, #KEYS do redis.call('EXPIRE', KEYS[i], ARGV[1]) end
end
local function incr(field, digits, sign)
  if digits ~= '0' then redis.call('HINCRBY', KEYS[1], field, sign .. digits) end
end
-- Drops a hold's amounts from the reserved totals; returns its credit draws ('' when it drew none), or nil when
-- there is no such hold (settled, released or lapsed already). The three ways a hold ends are below.
local function drop_hold(id)
  local hold = redis.call('HGET', KEYS[2], id)
  if not hold then return nil end
  redis.call('HDEL', KEYS[2], id)
  redis.call('ZREM', KEYS[3], id)
  if redis.call('EXISTS', KEYS[1]) == 1 then
    local i = 0
    for digits in string.gmatch(hold, '%d+') do
      i = i + 1
      incr(R[i], digits, '-')
    end
  end
  local drawn = redis.call('HGET', KEYS[2], 'd:' .. id)
  if not drawn then return '' end
  redis.call('HDEL', KEYS[2], 'd:' .. id)
  return drawn
end
-- The draws leave the period's drawn total (``d_micro``: the draws of the usage the counters hold), as the hold's
-- amounts left the reserved ones.
local function undraw(drawn)
  if redis.call('EXISTS', KEYS[1]) == 0 then return end
  for _, digits in string.gmatch(drawn, '(%S+) (%d+)') do
    redis.call('HINCRBY', KEYS[1], 'd_micro', '-' .. digits)
  end
end
-- Settled: the request was served; its draws stay drawn.
local function settle_hold(id)
  return drop_hold(id) ~= nil
end
-- Released: the request failed; its draws return to their grants (those still held).
local function release_hold(id)
  local drawn = drop_hold(id)
  if drawn == nil then return false end
  for grant, digits in string.gmatch(drawn, '(%S+) (%d+)') do
    if redis.call('HEXISTS', KEYS[4], 'm:' .. grant) == 1 then
      redis.call('HINCRBY', KEYS[4], 'r:' .. grant, digits)
    end
  end
  undraw(drawn)
  return true
end
-- Lapsed: the hold outlived its deadline unsettled (a replica died, or its settle failed). Its draws are parked
-- under "x:" id in the credits hash, out of the balance, until the ledger says whether the request was served
-- (resolve.lua).
local function lapse_hold(id)
  local drawn = drop_hold(id)
  if drawn == nil then return false end
  if drawn ~= '' then
    redis.call('HSET', KEYS[4], 'x:' .. id, drawn)
    undraw(drawn)
  end
  return true
end
