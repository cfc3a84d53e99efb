// Register one instance with @pikku/redis's RedisDeploymentService, then deregister it on the first stdin line.
// Usage: node redis_register.mjs REDIS_URL KEY_PREFIX DEPLOYMENT_ID ENDPOINT FUNCTION[,FUNCTION...] [HEARTBEAT_MS]
// KEY_PREFIX is Pikku's, without the trailing colon that Pikku adds itself.
import { createInterface } from 'node:readline'
import { RedisDeploymentService } from '@pikku/redis'

const [url, keyPrefix, deploymentId, endpoint, functionList, heartbeatMs = '1000'] = process.argv.slice(2)
const service = new RedisDeploymentService(
  { heartbeatInterval: Number(heartbeatMs), heartbeatTtl: 30000 },
  url,
  keyPrefix,
)
await service.init()
await service.start({ deploymentId, endpoint, functions: functionList.split(',') })
console.log('registered')

// Closing stdin (the test process died) also ends the wait.
const lines = createInterface({ input: process.stdin })
await new Promise((resolve) => {
  lines.once('line', resolve)
  lines.once('close', resolve)
})
await service.stop()
console.log('stopped')
process.exit(0)
