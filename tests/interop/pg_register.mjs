// Register one instance with @pikku/pg's PgDeploymentService, then deregister it on the first stdin line.
// Usage: node pg_register.mjs DSN SCHEMA DEPLOYMENT_ID ENDPOINT FUNCTION[,FUNCTION...]
import { createInterface } from 'node:readline'
import { PgDeploymentService } from '@pikku/pg'
import postgres from 'postgres'

const [dsn, schema, deploymentId, endpoint, functionList] = process.argv.slice(2)
// A client passed in stays ours to close: Pikku's stop() closes only a client it created.
const sql = postgres(dsn, { max: 2, onnotice: false, connect_timeout: 10 })
const service = new PgDeploymentService(
  { heartbeatInterval: 1000, heartbeatTtl: 30000 },
  sql,
  schema,
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
await sql.end({ timeout: 5 })
console.log('stopped')
process.exit(0)
