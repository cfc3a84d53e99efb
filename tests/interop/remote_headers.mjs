// Print, as JSON, the headers that Pikku's buildRemoteHeaders makes for one call.
// Usage: PIKKU_REMOTE_SECRET=... node remote_headers.mjs FUNCTION SESSION_JSON [TRACE_ID]
// SESSION_JSON "null" means no session. Pikku reads the secret from the environment through its
// LocalSecretService, as a deployed Pikku instance does.
import { buildRemoteHeaders } from '@pikku/core/remote'
import { LocalSecretService } from '@pikku/core/services'
import { RemoteJWTService } from './remote_jwt.mjs'

const [name, sessionJson, traceId] = process.argv.slice(2)
const jwt = new RemoteJWTService(process.env.PIKKU_REMOTE_SECRET)
const session = JSON.parse(sessionJson) ?? undefined
const headers = await buildRemoteHeaders(jwt, new LocalSecretService(), name, session, traceId)
console.log(JSON.stringify(headers))
