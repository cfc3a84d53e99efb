// Run one call's authorization header through Pikku's pikkuRemoteAuthMiddleware, as a Pikku instance
// receiving POST /remote/rpc/<FUNCTION> does, and print the outcome as JSON: {"accepted": true,
// "session": <the session the middleware restored, or null>} or {"rejected": <error class name>}.
// Usage: PIKKU_REMOTE_SECRET=... node remote_auth.mjs FUNCTION AUTHORIZATION
import { pikkuRemoteAuthMiddleware } from '@pikku/core/middleware'
import { LocalSecretService } from '@pikku/core/services'
import { RemoteJWTService } from './remote_jwt.mjs'

const [name, authorization] = process.argv.slice(2)
const services = {
  secrets: new LocalSecretService(),
  jwt: new RemoteJWTService(process.env.PIKKU_REMOTE_SECRET),
}
const headers = { authorization, 'content-type': 'application/json' }
let session = null
let reachedFunction = false
const wire = {
  http: {
    request: {
      // The path that Pikku's deployment services POST to.
      path: () => `/remote/rpc/${encodeURIComponent(name)}`,
      header: (headerName) => headers[headerName.toLowerCase()],
    },
  },
  setSession: async (restored) => {
    session = restored
  },
}
let outcome
try {
  await pikkuRemoteAuthMiddleware(services, wire, async () => {
    reachedFunction = true
  })
  outcome = reachedFunction ? { accepted: true, session } : { rejected: 'the middleware did not call next' }
} catch (error) {
  outcome = { rejected: error?.constructor?.name ?? String(error) }
}
console.log(JSON.stringify(outcome))
