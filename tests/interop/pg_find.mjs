// Print, as JSON, what @pikku/pg's PgDeploymentService.findFunction returns for one function name.
// Usage: node pg_find.mjs DSN SCHEMA FUNCTION
import { PgDeploymentService } from '@pikku/pg'
import postgres from 'postgres'

const [dsn, schema, name] = process.argv.slice(2)
// A client passed in stays ours to close: Pikku's stop() closes only a client it created.
const sql = postgres(dsn, { max: 2, onnotice: false, connect_timeout: 10 })
const service = new PgDeploymentService(
  { heartbeatTtl: 30000 },
  sql,
  schema,
)
await service.init()
const found = await service.findFunction(name)
console.log(JSON.stringify(found))
await service.stop()
await sql.end({ timeout: 5 })
process.exit(0)
