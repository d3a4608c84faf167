// referral-service from TypeScript: code generated from the protos with
// `buf generate --template buf.gen.ts.yaml` (protobuf-es v2) and a @connectrpc/connect client
// over gRPC (HTTP/2). Runs the whole flow: register, a duplicate refused with its ErrorInfo
// reason, log in, create a referral code, look it up by email, register a referral with it,
// list the referrals.
//
//   npm install && npm run generate --workspace examples/typescript   # at the repository root
//   npm run build --workspace examples/typescript
//   node examples/typescript/dist/flow.js [host:port]   # default $REFERRAL_GRPC_TARGET or 127.0.0.1:50051
import { randomBytes } from "node:crypto";

import { create } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import {
  BadRequestSchema,
  ErrorInfoSchema,
  RequestInfoSchema,
} from "@referral-service/googleapis/google/rpc/error_details_pb.js";

import { AuthService } from "./gen/ts/referral/v1/auth_pb.js";
import { CreateReferralCodeRequestSchema, ReferralService } from "./gen/ts/referral/v1/referral_pb.js";

const target = process.argv[2] ?? process.env.REFERRAL_GRPC_TARGET ?? "127.0.0.1:50051";
const password = "correct horse battery staple";

/** Sends `authorization: Bearer <token>` on every call once `token` is set. */
let token: string | undefined;
const bearer: Interceptor = (next) => async (request) => {
  if (token !== undefined) request.header.set("authorization", `Bearer ${token}`);
  return next(request);
};

const transport = createGrpcTransport({ baseUrl: `http://${target}`, interceptors: [bearer] });
const auth = createClient(AuthService, transport);
const referrals = createClient(ReferralService, transport);

/** The ErrorInfo reason, field violations and request id of a failed call. */
function details(error: unknown) {
  const failure = ConnectError.from(error);
  return {
    code: Code[failure.code],
    reason: failure.findDetails(ErrorInfoSchema)[0]?.reason ?? "",
    fields: failure.findDetails(BadRequestSchema).flatMap((bad) => bad.fieldViolations.map((v) => v.field)),
    requestId: failure.findDetails(RequestInfoSchema)[0]?.requestId ?? "",
  };
}

function log(step: string, value: unknown): void {
  console.log(`${step}: ${JSON.stringify(value, (_key, v: unknown) => (typeof v === "bigint" ? v.toString() : v))}`);
}

async function main(): Promise<void> {
  const suffix = randomBytes(4).toString("hex");
  const alice = `alice-${suffix}@example.com`;
  const bob = `bob-${suffix}@example.com`;

  const registered = await auth.register({ email: alice, password });
  log("registered", registered.user?.email);

  try {
    await auth.register({ email: alice.toUpperCase(), password });
    throw new Error("a duplicate registration succeeded");
  } catch (error) {
    const failure = details(error);
    log("duplicate registration refused", failure);
    if (failure.reason !== "EMAIL_ALREADY_REGISTERED") throw error;
  }

  const tokens = await auth.login({ email: alice, password });
  log("logged in", { tokenType: tokens.tokenType, expiresIn: tokens.expiresIn });
  token = tokens.accessToken;
  const me = (await auth.getCurrentUser({})).user;
  if (me === undefined) throw new Error("no current user");

  const created = await referrals.createReferralCode(
    create(CreateReferralCodeRequestSchema, { expiry: { case: "ttl", value: { seconds: 7n * 24n * 3600n } }, maxUses: 100 }),
  );
  log("created code", created.referralCode?.code);

  token = undefined; // the look-up and the registration are public
  const found = await referrals.getReferralCodeByEmail({ email: alice });
  if (found.referralCode?.code !== created.referralCode?.code) throw new Error("lookup returned another code");
  const referred = await auth.register({ email: bob, password, referralCode: found.referralCode?.code ?? "" });
  if (referred.user?.referrerId !== me.id) throw new Error("bob is not alice's referral");
  log("registered referral", { email: referred.user.email, referrerId: referred.user.referrerId });

  token = tokens.accessToken;
  const listed = await referrals.listReferrals({ referrerId: me.id, pageSize: 10 });
  log("referrals", { emails: listed.referrals.map((r) => r.email), totalSize: listed.totalSize });
  if (listed.referrals.length !== 1 || listed.referrals[0]?.email !== bob) throw new Error("bob is not listed");
  console.log("flow complete");
}

main().catch((error: unknown) => {
  console.error("flow failed:", error instanceof ConnectError ? details(error) : error);
  process.exit(1);
});
