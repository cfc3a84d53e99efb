// The JWTService that a Pikku peer passes to buildRemoteHeaders and pikkuRemoteAuthMiddleware, built on jose.
// Pikku's own JoseJWTService (packages/services/jose in github.com/pikkujs/pikku) is not on the npm registry
// as @pikku/jose, so this class does what that one does. It signs with HS256, with the secret's UTF-8 bytes
// as the key and a key id in the header. It sets iat to now and exp with Pikku's relative time helper.
// decode runs jose's checks: signature, algorithm and exp.
import { getRelativeTimeOffsetFromNow } from '@pikku/core'
import * as jose from 'jose'

export class RemoteJWTService {
  constructor(secret, keyId = 'pikku-remote') {
    this.key = new TextEncoder().encode(secret)
    this.keyId = keyId
  }

  async encode(expiresIn, payload) {
    return await new jose.SignJWT(payload)
      .setProtectedHeader({ alg: 'HS256', kid: this.keyId })
      .setIssuedAt()
      .setExpirationTime(getRelativeTimeOffsetFromNow(expiresIn))
      .sign(this.key)
  }

  async decode(token) {
    const { payload } = await jose.jwtVerify(token, this.key, { algorithms: ['HS256'] })
    return payload
  }
}
