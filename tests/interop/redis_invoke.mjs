// Call one function through @pikku/redis's RedisDeploymentService.invoke and print the outcome as JSON.
// @pikku/redis 0.12.18 has no findFunction: invoke reads the function's sorted set and the instance's
// hash, then POSTs to <endpoint>/remote/rpc/<name>. So the endpoint that receives the call shows
// which registration Pikku found.
// Usage: node redis_invoke.mjs REDIS_URL KEY_PREFIX FUNCTION DATA_JSON
import { RedisDeploymentService } from '@pikku/redis'

const [url, keyPrefix, name, dataJson] = process.argv.slice(2)
const service = new RedisDeploymentService({ heartbeatTtl: 30000 }, url, keyPrefix)
await service.init()
let outcome
try {
  outcome = { result: await service.invoke(name, JSON.parse(dataJson)) }
} catch (error) {
  outcome = { error: String(error?.message ?? error) }
}
console.log(JSON.stringify(outcome))
await service.stop()
process.exit(0)
