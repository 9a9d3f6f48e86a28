"""Thin web3 client for the TicketBroker contract (on-chain ticket settlement).

Why this shape: an orchestrator only needs a handful of broker calls (fund,
inspect a sender, check a ticket, redeem a winner, unlock and withdraw), and it
must work against any JSON-RPC node, so every transaction is signed locally
with eth_account and sent raw. The same client runs against an in-process
py-evm chain (tests, demos) or a real node such as anvil.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address
from web3 import Web3
from web3.contract.contract import Contract, ContractFunction
from web3.exceptions import ContractLogicError, TimeExhausted, Web3Exception
from web3.types import TxReceipt

from protocol.pm import Ticket

__all__ = [
    "CONTRACT_PATH",
    "DEFAULT_UNLOCK_PERIOD",
    "ChainError",
    "SenderInfo",
    "TicketBrokerClient",
    "compile_ticket_broker",
    "embedded_web3",
    "fund_account",
    "http_web3",
    "mine_blocks",
]

CONTRACT_PATH = Path(__file__).resolve().parents[1] / "contracts" / "TicketBroker.vy"
"""Vyper source of the broker; compiled on demand so the ABI never drifts from the code."""

DEFAULT_UNLOCK_PERIOD = 40
"""Blocks between unlock() and withdraw(); long enough to redeem in-flight winners."""

RECEIPT_TIMEOUT_S = 60.0
"""How long to wait for a transaction to be mined before giving up."""

_GAS_HEADROOM_NUM, _GAS_HEADROOM_DEN = 6, 5  # +20 % over eth_estimateGas

_PLACEHOLDER_FEES = {"gas": 0, "gasPrice": 0}
"""Given to build_transaction so it makes no estimate / fee calls; _fill sets the real ones."""

_T = TypeVar("_T")


def _provider_errors() -> tuple[type[BaseException], ...]:
    """Exceptions a node call may raise: web3's own, transport errors, and eth-tester's
    TransactionFailed (the in-process provider raises it for reverts instead of a web3 error)."""
    errors: tuple[type[BaseException], ...] = (Web3Exception, ValueError, OSError)
    try:
        from eth_tester.exceptions import TransactionFailed
    except ImportError:  # eth-tester is optional outside tests
        return errors
    return (*errors, TransactionFailed)


_PROVIDER_ERRORS = _provider_errors()


class ChainError(RuntimeError):
    """A broker call failed or reverted; the message names the call and the revert reason."""


@dataclass(frozen=True)
class SenderInfo:
    """A sender's funds at the broker, flattened from getSenderInfo's (Sender, ReserveInfo)."""

    deposit: int
    withdraw_block: int
    """0 when no unlock is in progress, else the first block at which withdraw() succeeds."""
    reserve: int
    """fundsRemaining: what the reserve can still pay out."""
    reserve_claimed: int
    """claimedInCurrentRound: total paid out of the reserve so far (no rounds on this broker)."""

    @property
    def unlocking(self) -> bool:
        """True while an unlock is in progress; recipients should stop accepting tickets."""
        return self.withdraw_block != 0


@functools.cache
def compile_ticket_broker(path: Path = CONTRACT_PATH) -> tuple[list[dict[str, Any]], str]:
    """Compile the Vyper source once per process and return (abi, bytecode hex)."""
    import vyper  # imported lazily: the compiler is slow to import and only needed here

    source = Path(path).read_text(encoding="utf-8")
    out = vyper.compile_code(source, contract_path=str(path), output_formats=["abi", "bytecode"])
    return out["abi"], out["bytecode"]


def _ticket_tuple(ticket: Ticket) -> tuple[str, str, int, int, int, bytes, bytes]:
    """The ABI tuple go-livepeer passes: (recipient, sender, faceValue, winProb, senderNonce,
    recipientRandHash, auxData)."""
    return (
        to_checksum_address(ticket.recipient),
        to_checksum_address(ticket.sender),
        ticket.face_value,
        ticket.win_prob,
        ticket.sender_nonce,
        ticket.recipient_rand_hash,
        ticket.aux_data(),
    )


def _reason(exc: BaseException) -> str:
    """A short human reason from a web3 / provider exception (never contains key material)."""
    if isinstance(exc, ContractLogicError) and exc.message:
        return str(exc.message)
    text = str(exc)
    return text if text.startswith("execution reverted") else f"{type(exc).__name__}: {text}"


def _guard(what: str, call: Callable[[], _T]) -> _T:
    """Run a node call, turning provider exceptions into ChainError naming `what`."""
    try:
        return call()
    except ChainError:
        raise
    except _PROVIDER_ERRORS as exc:
        raise ChainError(f"{what} failed: {_reason(exc)}") from exc


def _fill(w3: Web3, account: LocalAccount, tx: dict[str, Any]) -> dict[str, Any]:
    """Complete from/chainId/nonce/gas/fees from the node (EIP-1559 where it has a base fee)."""
    tx = dict(tx)
    tx.setdefault("from", account.address)
    tx.setdefault("chainId", w3.eth.chain_id)
    tx.setdefault("nonce", w3.eth.get_transaction_count(account.address, "pending"))
    if "gas" not in tx:
        estimate = w3.eth.estimate_gas(tx)  # type: ignore[arg-type]  # reverts surface here
        tx["gas"] = estimate * _GAS_HEADROOM_NUM // _GAS_HEADROOM_DEN
    if "gasPrice" not in tx and "maxFeePerGas" not in tx:
        base_fee = w3.eth.get_block("latest").get("baseFeePerGas")
        if base_fee is None:
            tx["gasPrice"] = w3.eth.gas_price
        else:
            tip = w3.eth.max_priority_fee
            tx["maxPriorityFeePerGas"] = tip
            tx["maxFeePerGas"] = 2 * base_fee + tip
    return tx


def _unfilled(tx: dict[str, Any]) -> dict[str, Any]:
    """Drop the placeholder gas/fee/nonce of build_transaction so _fill sets them in one place."""
    for key in ("gas", "gasPrice", "maxFeePerGas", "maxPriorityFeePerGas", "nonce"):
        tx.pop(key, None)
    return tx


def _send(w3: Web3, account: LocalAccount, what: str, tx: dict[str, Any]) -> TxReceipt:
    """Fill, sign locally, send raw and wait; raise ChainError on revert or timeout."""
    tx = _guard(what, lambda: _fill(w3, account, tx))
    signed = account.sign_transaction(tx)
    tx_hash = _guard(what, lambda: w3.eth.send_raw_transaction(signed.raw_transaction))
    try:
        receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=RECEIPT_TIMEOUT_S)
    except TimeExhausted as exc:
        raise ChainError(f"{what}: tx {tx_hash.hex()} not mined in {RECEIPT_TIMEOUT_S}s") from exc
    if receipt["status"] != 1:
        reason = _replay(w3, tx, receipt)
        raise ChainError(f"{what} reverted on chain (tx {tx_hash.hex()}): {reason}")
    return receipt


def _replay(w3: Web3, tx: dict[str, Any], receipt: TxReceipt) -> str:
    """Best-effort revert reason of a mined failure, by re-running it as eth_call."""
    call = {k: tx[k] for k in ("from", "to", "value", "data", "gas") if k in tx}
    try:
        w3.eth.call(call, receipt["blockNumber"] - 1)  # type: ignore[arg-type]
    except _PROVIDER_ERRORS as exc:
        return _reason(exc)
    return "no revert reason (state changed since, or out of gas)"


class TicketBrokerClient:
    """One account's view of a deployed TicketBroker: reads, and locally signed writes."""

    def __init__(self, w3: Web3, address: str, private_key: bytes) -> None:
        abi, _ = compile_ticket_broker()
        self.w3 = w3
        self._account: LocalAccount = Account.from_key(private_key)
        self.contract: Contract = w3.eth.contract(address=to_checksum_address(address), abi=abi)

    def __repr__(self) -> str:
        return f"TicketBrokerClient(broker={self.contract.address}, account={self.account})"

    @property
    def account(self) -> str:
        """Checksummed address that signs this client's transactions."""
        return self._account.address

    @property
    def address(self) -> str:
        """Checksummed address of the broker contract."""
        return str(self.contract.address)

    @classmethod
    def deploy(
        cls, w3: Web3, deployer_key: bytes, unlock_period: int = DEFAULT_UNLOCK_PERIOD
    ) -> TicketBrokerClient:
        """Deploy a fresh broker and return a client bound to it and to the deployer."""
        abi, bytecode = compile_ticket_broker()
        account: LocalAccount = Account.from_key(deployer_key)
        factory = w3.eth.contract(abi=abi, bytecode=bytecode)
        tx = _guard(
            "deploy",
            lambda: factory.constructor(unlock_period).build_transaction(
                {"from": account.address, **_PLACEHOLDER_FEES}
            ),
        )
        receipt = _send(w3, account, "deploy", _unfilled(tx))
        address = receipt["contractAddress"]
        if address is None:
            raise ChainError("deploy: receipt has no contract address")
        return cls(w3, address, deployer_key)

    def with_key(self, private_key: bytes) -> TicketBrokerClient:
        """Same broker, another signing account (e.g. the orchestrator vs the broadcaster)."""
        return type(self)(self.w3, self.address, private_key)

    # -- writes -------------------------------------------------------------------------

    def _transact(self, what: str, fn: ContractFunction, value: int = 0) -> TxReceipt:
        """Build the call's data, then sign and send it as this client's account."""
        tx = _guard(
            what,
            lambda: fn.build_transaction(
                {"from": self.account, "value": value, **_PLACEHOLDER_FEES}
            ),
        )
        return _send(self.w3, self._account, what, _unfilled(tx))

    def fund_deposit_and_reserve(self, deposit: int, reserve: int) -> TxReceipt:
        """Lock `deposit` + `reserve` wei as this account's ticket funds."""
        fn = self.contract.functions.fundDepositAndReserve(deposit, reserve)
        return self._transact("fundDepositAndReserve", fn, value=deposit + reserve)

    def fund_deposit(self, amount: int) -> TxReceipt:
        """Add `amount` wei to this account's deposit."""
        return self._transact("fundDeposit", self.contract.functions.fundDeposit(), value=amount)

    def fund_reserve(self, amount: int) -> TxReceipt:
        """Add `amount` wei to this account's reserve."""
        return self._transact("fundReserve", self.contract.functions.fundReserve(), value=amount)

    def redeem_winning_ticket(self, ticket: Ticket, sig: bytes, recipient_rand: int) -> TxReceipt:
        """Redeem one winner; this client's account must be the ticket's recipient."""
        fn = self.contract.functions.redeemWinningTicket(
            _ticket_tuple(ticket), bytes(sig), recipient_rand
        )
        return self._transact("redeemWinningTicket", fn)

    def batch_redeem_winning_tickets(
        self, tickets: Sequence[Ticket], sigs: Sequence[bytes], recipient_rands: Sequence[int]
    ) -> TxReceipt:
        """Redeem up to 32 winners in one transaction; any bad ticket reverts the batch."""
        fn = self.contract.functions.batchRedeemWinningTickets(
            [_ticket_tuple(t) for t in tickets], [bytes(s) for s in sigs], list(recipient_rands)
        )
        return self._transact("batchRedeemWinningTickets", fn)

    def unlock(self) -> TxReceipt:
        """Start the unlock period for this account's funds."""
        return self._transact("unlock", self.contract.functions.unlock())

    def cancel_unlock(self) -> TxReceipt:
        """Abort an unlock in progress."""
        return self._transact("cancelUnlock", self.contract.functions.cancelUnlock())

    def withdraw(self) -> TxReceipt:
        """After the unlock period, take back the whole deposit and reserve."""
        return self._transact("withdraw", self.contract.functions.withdraw())

    # -- reads --------------------------------------------------------------------------

    def get_sender_info(self, sender: str) -> SenderInfo:
        """Deposit, unlock state and reserve of `sender`."""
        (deposit, withdraw_block), (remaining, claimed) = _guard(
            "getSenderInfo",
            lambda: self.contract.functions.getSenderInfo(to_checksum_address(sender)).call(),
        )
        return SenderInfo(deposit, withdraw_block, remaining, claimed)

    def used_tickets(self, ticket_hash: bytes) -> bool:
        """Whether the ticket with this hash was already redeemed."""
        return bool(
            _guard("usedTickets", lambda: self.contract.functions.usedTickets(ticket_hash).call())
        )

    def ticket_hash(self, ticket: Ticket) -> bytes:
        """The hash as the contract computes it; lets callers cross-check protocol.pm."""
        return bytes(
            _guard(
                "getTicketHash",
                lambda: self.contract.functions.getTicketHash(_ticket_tuple(ticket)).call(),
            )
        )

    def unlock_period(self) -> int:
        """Blocks between unlock() and withdraw(), fixed at deployment."""
        return int(_guard("unlockPeriod", lambda: self.contract.functions.unlockPeriod().call()))

    def block_number(self) -> int:
        """Latest block number of the node."""
        return int(_guard("eth_blockNumber", lambda: self.w3.eth.block_number))

    def balance(self, address: str) -> int:
        """Wei balance of `address` at the latest block."""
        return int(
            _guard("eth_getBalance", lambda: self.w3.eth.get_balance(to_checksum_address(address)))
        )


# -- connections -------------------------------------------------------------------------


def http_web3(url: str, timeout_s: float = 30.0) -> Web3:
    """A Web3 connected to a JSON-RPC node over HTTP (anvil, geth, an Arbitrum RPC, ...)."""
    return Web3(Web3.HTTPProvider(url, request_kwargs={"timeout": timeout_s}))


def embedded_web3() -> Web3:
    """An in-process py-evm chain with prefunded, unlocked accounts; blocks mine per tx."""
    from eth_tester import EthereumTester, PyEVMBackend  # test-only dependency

    return Web3(Web3.EthereumTesterProvider(EthereumTester(PyEVMBackend())))


def fund_account(w3: Web3, address: str, wei: int) -> TxReceipt:
    """Send `wei` from the node's first unlocked dev account (eth-tester or anvil) to `address`."""
    funder = w3.eth.accounts[0]
    tx_hash = _guard(
        "fund_account",
        lambda: w3.eth.send_transaction(
            {"from": funder, "to": to_checksum_address(address), "value": wei}
        ),
    )
    receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=RECEIPT_TIMEOUT_S)
    if receipt["status"] != 1:
        raise ChainError(f"fund_account: transfer to {address} failed")
    return receipt


def mine_blocks(w3: Web3, count: int) -> None:
    """Advance the chain by `count` empty blocks (eth-tester or anvil), e.g. to end an unlock."""
    tester = getattr(w3.provider, "ethereum_tester", None)
    if tester is not None:
        tester.mine_blocks(count)
        return
    response = w3.provider.make_request("anvil_mine", [hex(count)])  # type: ignore[arg-type]
    if "error" in response:
        raise ChainError(f"mine_blocks: node refused anvil_mine: {response['error']}")
