-- Mirrors modelmeter.billing.drawdown.plan_draws: change both together. The live grants with something left,
-- in draw order, and what they hold in all.
local function live_grants(now)
  local grants, total = {}, 0
  local flat = redis.call('HGETALL', KEYS[4])
  for i = 1, #flat, 2 do
    local field = flat[i]
    if string.sub(field, 1, 2) == 'm:' then
      local id = string.sub(field, 3)
      local rank, expires = string.match(flat[i + 1], '(%S+) (%d+)')
      local left = tonumber(redis.call('HGET', KEYS[4], 'r:' .. id) or '0')
      expires = tonumber(expires)
      if left > 0 and (expires == 0 or expires > now) then
        grants[#grants + 1] = {id, rank, left}
        total = total + left
      end
    end
  end
  table.sort(grants, function(a, b) return a[2] < b[2] end)
  return grants, total
end
